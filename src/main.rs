fn main() -> std::process::ExitCode {
    rehydrate::cli::main()
}
