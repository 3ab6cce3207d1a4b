//! A gateway as a real process (the binary), for signals, reloads and exit codes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cascade");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A gateway process; killed if the test ends without stopping it.
pub struct Gateway {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, yaml: &str) -> Gateway {
        let port = free_port();
        let config = dir.join("cascade.yaml");
        std::fs::write(&config, yaml.replace("{port}", &port.to_string())).unwrap();
        Gateway::start_existing(dir, port)
    }

    /// Starts on `dir/cascade.yaml` as it is, listening on `port`.
    pub fn start_existing(dir: &Path, port: u16) -> Gateway {
        let config = dir.join("cascade.yaml");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the gateway never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Gateway {
            child: Some(child),
            port,
            config,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Sends `signal` (`TERM`, `HUP`, `INT`) to the process.
    pub fn signal(&self, signal: &str) {
        let id = self.child.as_ref().expect("running").id();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &id.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits for the process to exit: its exit code and everything it printed.
    pub fn wait(mut self) -> (i32, String, String) {
        let mut child = self.child.take().unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // Read both at once: a full pipe would block the process.
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        let _ = stderr.read_to_string(&mut err);
        out.push_str(&reader.join().unwrap_or_default());
        let status = child.wait().unwrap();
        (status.code().unwrap_or(-1), out, err)
    }

    /// SIGTERM, then the exit code and everything it printed.
    pub fn stop(self) -> (i32, String, String) {
        self.signal("TERM");
        self.wait()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
