/// mimalloc instead of glibc's malloc. The HTTP client's body buffers
/// (256-512 KiB each, one set per connection) fragment glibc's arenas: a
/// 16 GiB restore peaked 219 MiB RSS against 165 MiB for 1 GiB. Pinning
/// glibc's mmap threshold flattened that but cost 1.4 million page faults and
/// 2 s of system time per 16 GiB; mimalloc is flat without the faults (see
/// the README's flat-cost table).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
