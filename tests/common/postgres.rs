//! A real PostgreSQL server (Debian's `postgresql` package) on a free 127.0.0.1 port,
//! in a data directory of its own, stopped and removed on drop.
//!
//! `initdb` runs once per machine into a template (about a second); each server starts
//! from a copy of it (a fifth of that). PostgreSQL refuses to run as root, so under
//! root (CI) the server runs as the package's `postgres` user through `setpriv`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    tls: bool,
}

/// The directory holding `initdb`, `postgres` and `pg_isready` (the newest installed).
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Runs `program` as the `postgres` user when we are root, else as ourselves.
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_postgres(path: &Path) {
    if is_root() {
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status();
    }
}

/// A data directory made by `initdb`, shared by every server of this machine.
fn template(bin: &Path) -> Option<&'static PathBuf> {
    static TEMPLATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let version = bin.parent()?.file_name()?.to_str()?.to_string();
            let dir = std::env::temp_dir().join(format!("cascade-pg-template-{version}"));
            if dir.join("PG_VERSION").exists() {
                return Some(dir);
            }
            // Built beside, then renamed: test binaries running at once never see half a
            // template.
            let building = std::env::temp_dir().join(format!(
                "cascade-pg-template-{version}.{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&building);
            std::fs::create_dir_all(&building).ok()?;
            chown_to_postgres(&building);
            let ok = command(&bin.join("initdb"))
                .arg("-D")
                .arg(building.join("data"))
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
            if std::fs::rename(building.join("data"), &dir).is_err() && !dir.exists() {
                return None;
            }
            let _ = std::fs::remove_dir_all(&building);
            Some(dir)
        })
        .as_ref()
}

impl Postgres {
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(None)
    }

    /// A server that takes TCP connections over TLS only, with this certificate and key
    /// (PEM files); plain TCP is refused. The test's own queries go through the socket
    /// (`socket_client`).
    pub fn start_tls(cert: &Path, key: &Path) -> Option<Postgres> {
        Postgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Option<Postgres> {
        let bin = bin_dir()?;
        let template = template(&bin)?;
        let port = super::process::free_port();
        let dir = std::env::temp_dir().join(format!("cascade-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ok = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&dir)
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let mut pg = Postgres {
            child: None,
            port,
            dir,
            tls: tls.is_some(),
        };
        if let Some((cert, key)) = tls {
            std::fs::copy(cert, pg.dir.join("server.crt")).ok()?;
            std::fs::copy(key, pg.dir.join("server.key")).ok()?;
            std::fs::write(
                pg.dir.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .ok()?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                pg.dir.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .ok()?;
            chown_to_postgres(&pg.dir);
        }
        pg.launch(&bin)?;
        Some(pg)
    }

    fn launch(&mut self, bin: &Path) -> Option<()> {
        // Durability is not under test: no fsync makes each commit cheap.
        let child = command(&bin.join("postgres"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args(if self.tls {
                &[
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ][..]
            } else {
                &[][..]
            })
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=50",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        self.child = Some(child);
        for _ in 0..200 {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }

    /// The URL of the server's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (a fast shutdown; the data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT is PostgreSQL's fast shutdown: it ends every session at once.
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let bin = bin_dir().expect("postgres is installed");
        self.launch(&bin).expect("postgres restarts");
    }

    /// A client on the test's runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test server");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

impl Postgres {
    /// A client through the server's Unix socket (no TLS needed).
    pub async fn socket_client(&self) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect through the socket");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

/// A CA and a server certificate it signed for 127.0.0.1, made by `openssl`, in `dir`:
/// (ca.crt, server.crt, server.key).
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=cascade test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server, or `None` (and a note) where PostgreSQL is not installed; CI must have it.
pub fn postgres_or_skip() -> Option<Postgres> {
    let pg = Postgres::start();
    if pg.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide PostgreSQL (.ci/run installs Debian's postgresql)"
        );
        eprintln!("skipped: PostgreSQL is not installed (apt-get install postgresql)");
    }
    pg
}
