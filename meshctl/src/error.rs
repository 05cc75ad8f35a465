//! How meshctl fails: one line naming what failed and what to do, and an exit code.

/// A meshctl failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the control plane at {addr}: {cause} (is it running? `meshctl up` starts one)")]
    Unreachable { addr: String, cause: String },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Input(String),
}

impl CliError {
    pub fn from_status(s: tonic::Status, addr: &str) -> Self {
        match s.code() {
            tonic::Code::Unavailable if s.message().contains("transport") || s.message().is_empty() => {
                CliError::Unreachable { addr: addr.to_string(), cause: s.message().to_string() }
            }
            // What a plaintext client sees when the server speaks TLS and drops the connection
            // (which of these depends on when the close arrives).
            tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Cancelled
                if addr.starts_with("http://") =>
            {
                CliError::Unreachable {
                    addr: addr.to_string(),
                    cause: format!(
                        "{}; if the control plane serves TLS (its default), use an https:// URL",
                        s.message()
                    ),
                }
            }
            code => CliError::Refused(format!("{}: {}", code_name(code), s.message())),
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}").chars().fold(String::new(), |mut acc, c| {
        if c.is_uppercase() && !acc.is_empty() {
            acc.push(' ');
        }
        acc.push(c.to_ascii_lowercase());
        acc
    })
}
