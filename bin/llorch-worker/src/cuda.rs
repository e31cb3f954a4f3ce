//! `llorch-cuda`: the llorch worker on a Cuda device (--cuda-device N). All logic is in llorch-http.

fn main() -> std::process::ExitCode {
    llorch_http::run(llorch_http::Flavour::Cuda)
}
