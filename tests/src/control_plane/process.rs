//! A child process that logs to a file and cannot outlive the test binary.

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The supervisor each process runs under. It holds the read end of a pipe
/// from the test binary: when the test binary exits (even by a panic or a
/// signal), the pipe closes and the supervisor stops the process and removes
/// its directory. Rust cannot run code for a `static` at exit, so this is what
/// keeps a shared control plane from leaking processes.
const SUPERVISOR: &str = r#"
cleanup=$1; pidfile=$2; shift 2
"$@" &
child=$!
echo "$child" > "$pidfile"
{
  while read -r _; do :; done
  [ -n "$cleanup" ] && : > "$cleanup/.stopping"
  kill -TERM "$child" 2>/dev/null
  sleep 10
  kill -KILL "$child" 2>/dev/null
} <&0 &
watcher=$!
wait "$child"
rc=$?
kill "$watcher" 2>/dev/null
if [ -n "$cleanup" ] && [ -e "$cleanup/.stopping" ]; then rm -rf "$cleanup"; fi
exit "$rc"
"#;

/// A running child process under the supervisor.
pub struct Process {
    name: String,
    log: PathBuf,
    pidfile: PathBuf,
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
}

// === impl Process ===

impl Process {
    /// Starts `program` with `args`, logging stdout and stderr to
    /// `log_dir/<name>.log`. `cleanup`, if given, is removed after a
    /// requested stop (or once the test binary exits). Dropping the
    /// `Process` stops it.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        cleanup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::spawn_with_env(name, program, args, &[], log_dir, cleanup)
    }

    /// Like [`Process::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
        cleanup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let pidfile = log_dir.join(format!("{name}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        // Append: a restarted process keeps its earlier lines.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("opmesh-supervisor")
            .arg(cleanup.map(Path::as_os_str).unwrap_or_default())
            .arg(&pidfile)
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} ({})", name, program.display()))?;
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_string(),
            log,
            pidfile,
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
        })
    }

    /// The process's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path of the process's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the log file.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// The supervised program's pid (not the supervisor's), once known.
    pub async fn pid(&self) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = std::fs::read_to_string(&self.pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Some(pid);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `signal` (e.g. `"KILL"`, `"TERM"`) to the program itself.
    pub async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().await.context("the process has no pid file")?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!(
                "kill -{signal} {pid} failed ({} may have exited)",
                self.name
            );
        }
        Ok(())
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit on its own and returns
    /// its exit code (`None` if it was killed by a signal or is still running).
    pub async fn wait_exit(&self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status.code());
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the process to stop and waits up to `timeout` for it. This
    /// blocks: it is what `Drop` runs, after a test is done with the process.
    pub fn stop(&self, timeout: Duration) {
        // Closing stdin is the stop signal for the supervisor.
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `lines` lines of a file, or a note saying why it can't be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    // Logs can be large; the last 64 KiB hold far more than enough lines.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = String::new();
    let _ = file.read_to_string(&mut buf);
    let all: Vec<&str> = buf.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
