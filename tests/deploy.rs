//! What `deploy/` ships, checked against the code it deploys: the container
//! recipe, the Kubernetes manifests, the Grafana dashboard and the Prometheus
//! alerts; and the commands made for deployments (`health`, `completions`,
//! `man`).
//!
//! - Every manifest parses; every `rehydrate` command line in them and in the
//!   Containerfile is accepted by the binary's own parser ([`Cli`]).
//! - The Jobs' `podFailurePolicy` matches the exit-code table of
//!   `src/error.rs` ([`ExitCode::ALL`], [`ExitCode::retry_as_is`]).
//! - Targets and checkpoints sit on volumes that outlive the pod.
//! - Every metric the dashboard and the alerts name is one `src/metrics.rs`
//!   defines, as the Prometheus exporter renders it.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use rehydrate::cli::{Cli, Command as Sub};
use rehydrate::error::ExitCode;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The name of the rehydrate container in every pod template.
const CONTAINER: &str = "rehydrate";

fn deploy(path: &str) -> PathBuf {
    Path::new(ROOT).join("deploy").join(path)
}

/// Every document of every YAML file under `deploy/kubernetes/`, with its file.
fn manifests() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "deploy/kubernetes has {files:?}");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
            if value.is_null() {
                continue;
            }
            for key in ["apiVersion", "kind"] {
                assert!(value[key].is_string(), "{name}: a document without {key}: {value}");
            }
            assert!(value["metadata"]["name"].is_string(), "{name}: a {} without a name", value["kind"]);
            docs.push((name.clone(), value));
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a (String, Value)> {
    docs.iter().filter(|(_, d)| d["kind"] == kind).collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The annotation Kubernetes gives each pod of an Indexed Job its index in.
const COMPLETION_INDEX_FIELD: &str = "metadata.annotations['batch.kubernetes.io/job-completion-index']";

/// The argv of a container, with Kubernetes' `$(VAR)` references replaced by
/// the values the container's `env` gives them (an undefined one fails); a
/// variable holding an Indexed Job's completion index reads as 0.
fn container_argv(container: &Value) -> Vec<String> {
    container_argv_at(container, 0)
}

/// [`container_argv`] of the pod with completion index `index`.
fn container_argv_at(container: &Value, index: u64) -> Vec<String> {
    let index = index.to_string();
    let env: BTreeMap<&str, &str> = container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter_map(|e| {
                    let value = match e["value"].as_str() {
                        Some(value) => value,
                        None if e["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX_FIELD => index.as_str(),
                        None => return None,
                    };
                    Some((e["name"].as_str()?, value))
                })
                .collect()
        })
        .unwrap_or_default();
    let words = |key: &str| -> Vec<String> {
        container[key].as_array().map(|a| a.iter().map(|w| str_of(w).to_owned()).collect()).unwrap_or_default()
    };
    let mut argv = words("command");
    if argv.is_empty() {
        argv.push("rehydrate".to_owned()); // the image's ENTRYPOINT
    }
    argv.extend(words("args"));
    argv.into_iter()
        .map(|word| {
            let mut out = word.clone();
            while let Some(start) = out.find("$(") {
                let end = start + out[start..].find(')').unwrap();
                let name = &out[start + 2..end];
                let value = env.get(name).unwrap_or_else(|| panic!("{word}: $({name}) is not in the container's env"));
                out.replace_range(start..=end, value);
            }
            out
        })
        .collect()
}

/// Parse an argv with the binary's parser, or fail naming the command line.
fn parse(argv: &[String], context: &str) -> Cli {
    assert!(
        Path::new(&argv[0]).file_name().is_some_and(|n| n == "rehydrate"),
        "{context}: runs {:?}, not rehydrate",
        argv[0]
    );
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{context}: {argv:?} is refused:\n{e}"))
}

/// Pod templates of Jobs and DaemonSets: (file, workload kind, name, pod spec, pod metadata).
fn pod_templates(docs: &[(String, Value)]) -> Vec<(String, String, String, &Value, &Value)> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == "Job" || d["kind"] == "DaemonSet")
        .map(|(file, d)| {
            let template = &d["spec"]["template"];
            (
                file.clone(),
                str_of(&d["kind"]).to_owned(),
                str_of(&d["metadata"]["name"]).to_owned(),
                &template["spec"],
                &template["metadata"],
            )
        })
        .collect()
}

fn rehydrate_container(pod: &Value) -> &Value {
    let containers = pod["containers"].as_array().unwrap();
    let found: Vec<&Value> = containers.iter().filter(|c| c["name"] == CONTAINER).collect();
    assert_eq!(found.len(), 1, "one container named {CONTAINER}: {pod}");
    assert!(str_of(&found[0]["image"]).contains("rehydrate"), "{}", found[0]);
    found[0]
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// The pod volume a path inside the container lives on, and the path below
/// its mount point.
fn volume_of<'a>(pod: &'a Value, container: &Value, path: &Path) -> Option<(&'a Value, PathBuf)> {
    let mount = container["volumeMounts"]
        .as_array()?
        .iter()
        .filter(|m| path.starts_with(str_of(&m["mountPath"])))
        .max_by_key(|m| str_of(&m["mountPath"]).len())?;
    let volume = pod["volumes"].as_array()?.iter().find(|v| v["name"] == mount["name"])?;
    Some((volume, path.strip_prefix(str_of(&mount["mountPath"])).unwrap().to_owned()))
}

fn pvc<'a>(docs: &'a [(String, Value)], volume: &Value) -> Option<&'a Value> {
    let claim = volume["persistentVolumeClaim"]["claimName"].as_str()?;
    of_kind(docs, "PersistentVolumeClaim").into_iter().map(|(_, d)| d).find(|d| d["metadata"]["name"] == claim)
}

#[test]
fn every_rehydrate_command_line_in_the_manifests_parses() {
    let docs = manifests();
    let mut parsed = 0;
    for (file, kind, name, pod, _) in pod_templates(&docs) {
        let all =
            pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().into_iter().flatten());
        for container in all.filter(|c| str_of(&c["image"]).contains("rehydrate")) {
            let context = format!("{file}: {kind} {name}, container {}", container["name"]);
            let cli = parse(&container_argv(container), &context);
            if let Sub::Restore(args) = &cli.command {
                rehydrate::store::StoreUrl::parse_manifest(&args.manifest)
                    .unwrap_or_else(|e| panic!("{context}: --manifest {}: {e}", args.manifest));
            }
            parsed += 1;
            // Exec probes run the binary too.
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(command) = container[probe]["exec"]["command"].as_array() {
                    let argv: Vec<String> = command.iter().map(|w| str_of(w).to_owned()).collect();
                    parse(&argv, &format!("{context} {probe}"));
                }
            }
        }
    }
    assert!(parsed >= 3, "only {parsed} rehydrate command lines found");
    // The parser used is the binary's: it rejects what the binary rejects.
    assert!(Cli::try_parse_from(["rehydrate", "restore", "--manifest", "x"]).is_err());
    Cli::command().debug_assert();
}

#[test]
fn pod_failure_policies_match_the_exit_code_table() {
    let docs = manifests();
    let jobs = of_kind(&docs, "Job");
    assert!(jobs.len() >= 2, "a block Job and a file Job");
    for (file, job) in jobs {
        let spec = &job["spec"];
        assert_eq!(spec["template"]["spec"]["restartPolicy"], "Never", "{file}: podFailurePolicy needs Never");
        let per_index = spec["backoffLimitPerIndex"].as_u64();
        let limit = per_index.or(spec["backoffLimit"].as_u64());
        assert!(limit.is_some_and(|n| n > 0), "{file}: retries need a backoffLimit or backoffLimitPerIndex");
        let rules =
            spec["podFailurePolicy"]["rules"].as_array().unwrap_or_else(|| panic!("{file}: no podFailurePolicy"));
        // The first rule naming a code decides (Kubernetes evaluates in order).
        let mut action_of: BTreeMap<u64, &str> = BTreeMap::new();
        for rule in rules.iter().filter(|r| r["onExitCodes"].is_object()) {
            let on = &rule["onExitCodes"];
            assert_eq!(on["containerName"], CONTAINER, "{file}: {rule}");
            assert_eq!(on["operator"], "In", "{file}: {rule}");
            for code in on["values"].as_array().unwrap() {
                let code = code.as_u64().unwrap();
                assert!(
                    ExitCode::ALL.iter().any(|c| *c as u64 == code && *c != ExitCode::Success),
                    "{file}: exit code {code} is not a failure code of src/error.rs"
                );
                action_of.entry(code).or_insert_with(|| str_of(&rule["action"]));
            }
        }
        for code in ExitCode::ALL.into_iter().filter(|c| *c != ExitCode::Success) {
            let action = action_of.get(&(code as u64)).unwrap_or_else(|| panic!("{file}: exit code {code:?} unmapped"));
            // An Indexed Job with retries per index may fail just the index
            // (the other shards finish; the Job fails at the end).
            let expected: &[&str] = match (code.retry_as_is(), per_index.is_some()) {
                (true, _) => &["Count", "Ignore"],
                (false, false) => &["FailJob"],
                (false, true) => &["FailJob", "FailIndex"],
            };
            assert!(
                expected.contains(action),
                "{file}: exit code {} ({code:?}) maps to {action}, the code's table says {expected:?}",
                code as u8
            );
        }
        assert!(
            rules.iter().any(|r| r["action"] == "Ignore" && r["onPodConditions"][0]["type"] == "DisruptionTarget"),
            "{file}: an evicted or preempted pod should not count as a failure"
        );
    }
}

#[test]
fn job_targets_and_checkpoints_are_on_volumes_that_outlive_the_pod() {
    let docs = manifests();
    let mut seen = BTreeSet::new();
    for (file, kind, _, pod, _) in pod_templates(&docs).into_iter().filter(|t| t.1 == "Job") {
        let container = rehydrate_container(pod);
        let Sub::Restore(args) = parse(&container_argv(container), &file).command else {
            panic!("{file}: the {kind} does not run `rehydrate restore`");
        };
        let state = env_value(container, "STATE_DIRECTORY").unwrap_or_else(|| panic!("{file}: no STATE_DIRECTORY"));
        let (volume, _) =
            volume_of(pod, container, Path::new(state)).unwrap_or_else(|| panic!("{file}: {state} is not on a volume"));
        let claim =
            pvc(&docs, volume).unwrap_or_else(|| panic!("{file}: the checkpoint volume is not a PVC of this file"));
        assert_ne!(claim["spec"]["volumeMode"], "Block", "{file}: checkpoints need a filesystem");
        let device = container["volumeDevices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| Path::new(str_of(&d["devicePath"])) == args.target));
        match device {
            Some(device) => {
                let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == device["name"]).unwrap();
                let claim =
                    pvc(&docs, volume).unwrap_or_else(|| panic!("{file}: the device is not a PVC of this file"));
                assert_eq!(claim["spec"]["volumeMode"], "Block", "{file}: a device path needs volumeMode: Block");
                seen.insert("block");
            }
            None => {
                let (volume, below) = volume_of(pod, container, &args.target)
                    .unwrap_or_else(|| panic!("{file}: {} is on no volume", args.target.display()));
                assert!(!below.as_os_str().is_empty(), "{file}: the target is the mount point itself");
                assert!(pvc(&docs, volume).is_some(), "{file}: the target's volume is not a PVC of this file");
                seen.insert("file");
            }
        }
    }
    assert_eq!(seen, BTreeSet::from(["block", "file"]), "a block-device Job and a file Job");
}

/// The Indexed Job: each pod restores shard `index/completions` (`--blocks
/// I/N`), so the shards cover the volume once; retries are per index; the
/// target and the checkpoints are on volumes every shard's pod can reach.
#[test]
fn the_indexed_job_gives_each_pod_its_shard_of_the_volume() {
    use rehydrate::block::{BlockLayout, BlockSelection};
    let docs = manifests();
    let indexed: Vec<_> =
        of_kind(&docs, "Job").into_iter().filter(|(_, d)| d["spec"]["completionMode"] == "Indexed").collect();
    assert_eq!(indexed.len(), 1, "one Indexed Job of shards");
    let (file, job) = indexed[0];
    let spec = &job["spec"];
    let completions = spec["completions"].as_u64().unwrap_or_else(|| panic!("{file}: no completions"));
    assert!(completions > 1, "{file}: one shard is a plain Job");
    assert!(spec["backoffLimitPerIndex"].as_u64().is_some_and(|n| n > 0), "{file}: no backoffLimitPerIndex");
    let pod = &spec["template"]["spec"];
    let container = rehydrate_container(pod);
    // A layout with a block count that does not divide evenly.
    let layout = BlockLayout::new(1001 * 4096 + 7, 4096).unwrap();
    let mut next = 0;
    for index in 0..completions {
        let argv = container_argv_at(container, index);
        let Sub::Restore(args) = parse(&argv, file).command else { panic!("{file}: not a restore") };
        let selection = args.blocks.unwrap_or_else(|| panic!("{file}: pod {index} restores without --blocks"));
        assert_eq!(selection, BlockSelection::Shard { index, count: completions }, "{file}: pod {index}: {argv:?}");
        let range = selection.resolve(&layout).unwrap();
        assert_eq!(range.start, next, "{file}: shards leave a gap or overlap");
        next = range.end;
    }
    assert_eq!(next, layout.block_count(), "{file}: the shards do not cover the volume");
    // Pods of several nodes reach the target and the checkpoints.
    for volume in pod["volumes"].as_array().unwrap() {
        let claim = pvc(&docs, volume).unwrap_or_else(|| panic!("{file}: {volume} is not a PVC of this file"));
        let modes = claim["spec"]["accessModes"].as_array().unwrap();
        assert!(
            modes.iter().any(|m| m == "ReadWriteMany"),
            "{file}: {} is not ReadWriteMany",
            claim["metadata"]["name"]
        );
    }
}

#[test]
fn the_worker_daemonset_service_config_and_token_fit_together() {
    let docs = manifests();
    let daemonsets: Vec<_> = pod_templates(&docs).into_iter().filter(|t| t.1 == "DaemonSet").collect();
    assert_eq!(daemonsets.len(), 1);
    let (file, _, _, pod, meta) = &daemonsets[0];
    let container = rehydrate_container(pod);
    let Sub::Serve(args) = parse(&container_argv(container), file).command else {
        panic!("{file}: the DaemonSet does not run `rehydrate serve`");
    };
    // The config file is a ConfigMap key, and it is a valid config.
    let config_path = args.config.unwrap_or_else(|| panic!("{file}: serve without --config"));
    let mount =
        container["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == config_path.to_str().unwrap());
    let mount = mount.unwrap_or_else(|| panic!("{file}: nothing mounted at {}", config_path.display()));
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    let map_name = str_of(&volume["configMap"]["name"]);
    let (_, map) = of_kind(&docs, "ConfigMap").into_iter().find(|(_, d)| d["metadata"]["name"] == map_name).unwrap();
    let toml = str_of(&map["data"][str_of(&mount["subPath"])]);
    let config = rehydrate::config::Config::parse(toml).unwrap_or_else(|e| panic!("{file}: the worker config: {e}"));

    // Tokens from a Secret; state and targets on the node.
    let tokens = config.worker.tokens_file.clone().unwrap_or_else(|| panic!("{file}: no tokens_file"));
    let (volume, _) = volume_of(pod, container, &tokens).unwrap();
    assert!(volume["secret"]["secretName"].is_string(), "{file}: tokens_file is not on a Secret volume");
    for dir in [config.worker_state_dir(), config.checkpoint_dir()].iter().chain(&config.worker.target_roots) {
        let (volume, _) =
            volume_of(pod, container, dir).unwrap_or_else(|| panic!("{file}: {} is on no volume", dir.display()));
        assert!(volume["hostPath"]["path"].is_string(), "{file}: {} is not on the node", dir.display());
    }

    // One port everywhere: the listener, the container, the scrape, the Service.
    let port: u64 = config.worker.listen.rsplit(':').next().unwrap().parse().unwrap();
    let container_port = &container["ports"][0];
    assert_eq!(container_port["containerPort"], port, "{file}");
    let annotations = &meta["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), 1);
    let service = &services[0].1["spec"];
    assert_eq!(service["internalTrafficPolicy"], "Local", "the API must stay on the node");
    for (key, value) in service["selector"].as_object().unwrap() {
        assert_eq!(&meta["labels"][key], value, "the Service does not select the worker's pods");
    }
    let target_port = &service["ports"][0]["targetPort"];
    assert!(*target_port == container_port["name"] || *target_port == port, "{target_port}");
}

/// Instructions of the runtime stage of the Containerfile (after the last
/// FROM), with continuation lines joined.
fn runtime_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("Containerfile")).unwrap();
    let joined =
        text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n").replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (word, rest) = l.trim().split_once(' ').unwrap_or((l.trim(), ""));
            (word.to_uppercase(), rest.trim().to_owned())
        })
        .collect();
    let last_from = instructions.iter().rposition(|(w, _)| w == "FROM").unwrap();
    assert!(last_from > 0, "a multi-stage build");
    instructions[last_from..].to_vec()
}

fn exec_form(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not an exec-form array: {text}: {e}"))
}

#[test]
fn the_containerfile_runs_serve_as_non_root_with_a_health_check_and_a_state_volume() {
    let stage = runtime_stage();
    let one = |word: &str| -> String {
        let found: Vec<&String> = stage.iter().filter(|(w, _)| w == word).map(|(_, r)| r).collect();
        assert_eq!(found.len(), 1, "one {word} in the runtime stage: {found:?}");
        found[0].clone()
    };
    let mut argv = exec_form(&one("ENTRYPOINT"));
    argv.extend(exec_form(&one("CMD")));
    assert!(matches!(parse(&argv, "Containerfile CMD").command, Sub::Serve(_)));
    let health = one("HEALTHCHECK");
    let probe = exec_form(&health[health.find("CMD [").unwrap() + 4..]);
    assert!(matches!(parse(&probe, "Containerfile HEALTHCHECK").command, Sub::Health(_)));

    let user = one("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "the runtime runs as root: USER {user}");
    let state = one("ENV");
    let state = state.strip_prefix("STATE_DIRECTORY=").unwrap_or_else(|| panic!("ENV {state}"));
    assert_eq!(exec_form(&one("VOLUME")), vec![state.to_owned()], "the state directory is the volume");
    // Only the binary and its state directory come from the build stage.
    let copies: Vec<&String> = stage.iter().filter(|(w, _)| w == "COPY").map(|(_, r)| r).collect();
    assert!(copies.iter().all(|c| c.contains("--from=build")), "{copies:?}");
    assert!(copies.iter().any(|c| c.ends_with(&argv[0])), "the binary is not copied to {}", argv[0]);
}

/// The runtime image (distroless/cc) has glibc and libgcc and nothing else:
/// the binary must need no other shared library.
#[test]
fn the_binary_needs_only_the_libraries_of_the_runtime_image() {
    let out = match Command::new("readelf").args(["-d", env!("CARGO_BIN_EXE_rehydrate")]).output() {
        Ok(out) if out.status.success() => out,
        _ => {
            eprintln!("SKIP: readelf is not installed");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(!needed.is_empty(), "{text}");
    let glibc = ["libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1"];
    for lib in needed {
        assert!(glibc.contains(&lib) || lib.starts_with("ld-linux"), "{lib} is not in the runtime image");
    }
}

/// Metric names `src/metrics.rs` defines, as the Prometheus exporter renders
/// them (a histogram becomes a summary: NAME{quantile}, NAME_sum, NAME_count).
fn exported_metric_names() -> BTreeSet<String> {
    let source = std::fs::read_to_string(Path::new(ROOT).join("src/metrics.rs")).unwrap();
    let mut constants: BTreeMap<String, String> = BTreeMap::new();
    for line in source.lines() {
        if let Some(rest) = line.trim().strip_prefix("pub const ")
            && let Some((ident, value)) = rest.split_once(": &str = \"")
            && value.starts_with("rehydrate_")
        {
            constants.insert(ident.to_owned(), value.trim_end_matches("\";").to_owned());
        }
    }
    assert!(constants.len() >= 20, "{constants:?}");
    // `describe_KIND!(IDENT, …)` says each metric's kind, however formatted.
    let compact: String = source.split_whitespace().collect();
    let kind_of = |ident: &str| -> Option<&str> {
        ["counter", "gauge", "histogram"]
            .into_iter()
            .find(|kind| compact.contains(&format!("describe_{kind}!({ident},")))
    };
    // Record one value of each described metric through the exporter the
    // worker installs, and read back the series names it renders.
    let handle = rehydrate::api::metrics_handle().unwrap();
    let histograms = constants.keys().filter(|ident| kind_of(ident) == Some("histogram")).count();
    assert!(histograms >= 2, "the fetch and fdatasync latency histograms are not described");
    let mut names = BTreeSet::new();
    for (ident, name) in &constants {
        match kind_of(ident) {
            Some("counter") => metrics::counter!(name.clone()).increment(1),
            Some("gauge") => metrics::gauge!(name.clone()).set(1.0),
            Some("histogram") => metrics::histogram!(name.clone()).record(0.5),
            // Rendered by the API itself (the per-job gauge), as is.
            _ => {
                names.insert(name.clone());
            }
        }
    }
    for line in handle.render().lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.split(['{', ' ']).next().unwrap();
        names.insert(series.to_owned());
    }
    for name in constants.values() {
        assert!(
            names.iter().any(|n| n.starts_with(name.as_str())),
            "{name} was not rendered: the exporter renamed it?"
        );
    }
    names
}

/// Metric names in a PromQL expression.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("rehydrate_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/rehydrate.json")).unwrap()).unwrap();
    assert!(dashboard["title"].is_string() && dashboard["panels"].is_array());
    let mut exprs = Vec::new();
    fn walk(panels: &Value, exprs: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(str_of(&target["expr"]).to_owned());
            }
            walk(&panel["panels"], exprs);
        }
    }
    walk(&dashboard["panels"], &mut exprs);
    exprs
}

fn alert_rules() -> Vec<Value> {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).unwrap();
    let rules: Value = serde_yaml_ng::from_str(&text).unwrap();
    let groups = rules["groups"].as_array().unwrap();
    groups.iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect()
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_code_exports() {
    let exported = exported_metric_names();
    let dashboard = dashboard_exprs();
    let alerts: Vec<String> = alert_rules().iter().map(|r| str_of(&r["expr"]).to_owned()).collect();
    let mut used = BTreeSet::new();
    for (what, exprs) in [("deploy/grafana/rehydrate.json", &dashboard), ("deploy/prometheus/alerts.yaml", &alerts)] {
        assert!(exprs.len() >= 5, "{what}: {exprs:?}");
        for expr in exprs.iter() {
            let names = metric_names_in(expr);
            assert!(!names.is_empty(), "{what}: {expr} names no rehydrate metric");
            for name in names {
                assert!(exported.contains(&name), "{what}: {name} is not a metric the code exports ({expr})");
                used.insert(name);
            }
        }
    }
    // The signals the dashboard is for.
    for signal in [
        "rehydrate_settled_bytes_total",
        "rehydrate_job_progress_ratio",
        "rehydrate_stalled_restores",
        "rehydrate_oldest_inflight_block_age_seconds",
        "rehydrate_fetch_requests_total",
        "rehydrate_fetch_fallbacks_total",
        "rehydrate_target_sync_latency_seconds",
        "rehydrate_inflight_attempts_max",
        "rehydrate_nbd_read_latency_seconds",
        "rehydrate_nbd_demand_fetches_total",
    ] {
        assert!(
            dashboard.iter().any(|e| metric_names_in(e).iter().any(|n| n == signal)),
            "the dashboard lacks {signal}"
        );
    }
    let alerted: BTreeSet<String> = alerts.iter().flat_map(|e| metric_names_in(e)).collect();
    for stall in [
        "rehydrate_stalled_restores",
        "rehydrate_job_progress_ratio",
        "rehydrate_inflight_attempts_max",
        "rehydrate_job_elapsed_seconds",
        "rehydrate_job_eta_seconds",
    ] {
        assert!(alerted.contains(stall), "no alert on {stall}");
    }
    for rule in alert_rules() {
        assert!(rule["alert"].is_string() && rule["annotations"]["summary"].is_string(), "{rule}");
    }
}

/// `promtool`, where installed, checks the PromQL of the alerts and of every
/// dashboard panel, and runs the alerts' unit tests (Debian's `prometheus`
/// package has it).
#[test]
fn promtool_accepts_the_alerts_and_the_dashboard_queries_and_passes_the_alert_tests() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIP: promtool is not installed");
        return;
    }
    let check = |path: &Path| {
        let out = Command::new("promtool").args(["check", "rules"]).arg(path).output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    check(&deploy("prometheus/alerts.yaml"));
    // The alerts fire on the series they are for, and not before their time.
    let out =
        Command::new("promtool").args(["test", "rules"]).arg(deploy("prometheus/alerts.test.yaml")).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:panel{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let path = dir.path().join("dashboard.yaml");
    std::fs::write(&path, rules).unwrap();
    check(&path);
}

/// `kubernetes-validate` (PyPI), where installed, checks every manifest
/// against the Kubernetes API schemas, rejecting unknown fields.
#[test]
fn the_manifests_match_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes")).unwrap().map(|e| e.unwrap().path()).collect();
    let out = match Command::new("kubernetes-validate").args(["--strict", "--quiet"]).args(&files).output() {
        Ok(out) => out,
        Err(_) => {
            eprintln!("SKIP: kubernetes-validate is not installed (pip install kubernetes-validate)");
            return;
        }
    };
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rehydrate"));
    command.env("REHYDRATE_LOG", "error").env_remove("REHYDRATE_SERVER");
    command
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(command: &mut Command) -> Run {
    let out = command.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn subcommand_names() -> Vec<String> {
    Cli::command().get_subcommands().map(|s| s.get_name().to_owned()).collect()
}

#[test]
fn completions_cover_every_subcommand_in_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let r = run(bin().args(["completions", shell]));
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        for name in subcommand_names().iter().chain(&["--manifest".to_owned(), "--secondary".to_owned()]) {
            assert!(r.stdout.contains(name.trim_start_matches('-')), "{shell} completions lack {name}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let script = dir.path().join("rehydrate.bash");
            std::fs::write(&script, &r.stdout).unwrap();
            // Sourcing it registers the completion function without errors.
            let check = run(Command::new("bash")
                .arg("-c")
                .arg(format!("source {} && complete -p rehydrate", script.display())));
            assert_eq!(check.code, 0, "{}", check.stderr);
            assert!(check.stdout.contains("rehydrate"), "{}", check.stdout);
        }
    }
    let r = run(bin().args(["completions", "tcsh"]));
    assert_eq!(r.code, ExitCode::Usage as i32, "an unknown shell is a usage error");
}

#[test]
fn the_man_page_lists_every_subcommand_and_one_page_per_command_is_written() {
    let r = run(bin().arg("man"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with(".ie \\n(.g .ds Aq") || r.stdout.contains(".TH rehydrate 1"), "{}", &r.stdout[..200]);
    for name in subcommand_names() {
        assert!(r.stdout.contains(&name), "the man page lacks {name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let r = run(bin().arg("man").arg("--dir").arg(dir.path()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut expected: BTreeSet<String> = subcommand_names().iter().map(|n| format!("rehydrate-{n}.1")).collect();
    expected.insert("rehydrate.1".to_owned());
    let written: BTreeSet<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(expected.is_subset(&written), "missing pages: {:?}", expected.difference(&written).collect::<Vec<_>>());
    let restore = std::fs::read_to_string(dir.path().join("rehydrate-restore.1")).unwrap();
    assert!(restore.contains("manifest") && restore.contains("secondary"), "{restore}");
    // groff, where installed, renders the page without complaint.
    if let Ok(out) =
        Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(dir.path().join("rehydrate.1")).output()
    {
        assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let r = run(bin().arg("man").arg("--dir").arg(dir.path().join("no/such/dir")));
    assert_eq!(r.code, ExitCode::IoFailure as i32, "{}", r.stderr);
}

/// A child process killed and reaped however the test ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn health_exits_0_against_a_live_worker_and_1_against_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut worker = Reaped(
        bin()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    loop {
        let r = run(bin().args(["health", "--server", &server]));
        if r.code == 0 {
            assert!(r.stdout.contains("200"), "{}", r.stdout);
            break;
        }
        assert_eq!(r.code, 1, "unhealthy is 1 (Docker's HEALTHCHECK reads 2 as reserved): {}", r.stderr);
        let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
        assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited: {log}");
        assert!(start.elapsed() < Duration::from_secs(60), "the worker never answered: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = run(bin().args(["health", "--ready", "--server", &server]));
    assert_eq!(r.code, 0, "{}", r.stderr);

    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    let r = run(bin().args(["health", "--server", &server, "--timeout-millis", "2000"]));
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("unhealthy"), "{}", r.stderr);
    let r = run(bin().args(["health", "--server", "ftp://x"]));
    assert_eq!(r.code, ExitCode::Usage as i32, "{}", r.stderr);
}
