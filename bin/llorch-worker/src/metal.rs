//! `llorch-metal`: the llorch worker on a Metal device (--metal-device N). All logic is in llorch-http.

fn main() -> std::process::ExitCode {
    llorch_http::run(llorch_http::Flavour::Metal)
}
