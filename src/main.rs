fn main() -> std::process::ExitCode {
    // Crash tests arm fail points through the FAILPOINTS environment variable
    // (`name=actions;…`, see the `fail` crate). A `panic` action there stands
    // for a crash at that point, so the panic aborts the process: no
    // unwinding, no destructor cleans up after it, exactly like kill -9.
    #[cfg(feature = "failpoints")]
    let _fail_scenario = {
        if std::env::var_os("FAILPOINTS").is_some() {
            std::panic::set_hook(Box::new(|info| {
                eprintln!("rehydrate: {info}; aborting (FAILPOINTS crash)");
                std::process::abort();
            }));
        }
        fail::FailScenario::setup()
    };
    rehydrate::cli::main()
}
