//! `llorch-cpu`: the llorch worker on the CPU. All logic is in llorch-http.

fn main() -> std::process::ExitCode {
    llorch_http::run(llorch_http::Flavour::Cpu)
}
