//! Commands, network namespaces and processes: the few system operations the lab is made of.
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Runs a command; its stdout, or an error naming it with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (scripts/setup.sh installs it)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS…`.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// `ip -n NS ARGS…`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `ip netns exec NS CMD…` (for sysctl and ethtool, which act on the calling namespace).
pub fn exec_in(ns: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(cmd);
    run("ip", &all)
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Names of every named network namespace.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Creates a namespace (deleting a stale one of the same name) with loopback up, IPv6 off (no
/// router solicitations or DAD noise) and no reverse-path filtering; `forward` turns on routing.
pub fn netns_add(name: &str, forward: bool) -> anyhow::Result<()> {
    if netns_exists(name) {
        netns_del(name);
    }
    ip(&["netns", "add", name])?;
    let mut sysctl = vec![
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ];
    if forward {
        sysctl.push("net.ipv4.ip_forward=1");
    }
    exec_in(name, &sysctl)?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Kills every process left in the namespace, then deletes it. Errors are ignored: this is
/// cleanup, and what is left is reported by whoever checks for leftovers.
pub fn netns_del(name: &str) {
    for pid in netns_pids(name) {
        stop(pid, Duration::from_millis(500));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// `ip netns pids NS`: the processes whose network namespace it is.
pub fn netns_pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a thread that entered the namespace (setns affects only that thread); sockets
/// made in `f` stay in the namespace.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let file = File::open(netns_path(name)).with_context(|| format!("netns {name}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: a valid namespace fd; CLONE_NEWNET changes this thread's namespace only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {name}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Starts `cmd` as a daemon inside namespace `ns`: its own session (a Ctrl-C in the caller's
/// terminal does not reach it; it outlives the caller), stdin from /dev/null, stdout and stderr
/// appended to `log`. Returns its pid. Only the network namespace changes (unlike `ip netns
/// exec`, which also remounts /sys and would hide bpffs).
pub fn spawn_in_netns(ns: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<i32> {
    let netns = File::open(netns_path(ns)).with_context(|| format!("netns {ns}"))?;
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let fd = netns.as_raw_fd();
    // SAFETY: setns and setsid are async-signal-safe; fd stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {cmd:?} in {ns}"))?;
    drop(netns);
    Ok(child.id() as i32)
}

/// Whether `pid` runs (a zombie does not count). Reaps it first if it is our child.
pub fn alive(pid: i32) -> bool {
    // SAFETY: waitpid with WNOHANG on a pid; ECHILD for a process that is not our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Whether `pid` runs the program `exe` (by argv[0]'s file name): a pid file must not make us kill
/// an unrelated process that reused the pid.
pub fn runs(pid: i32, exe: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
        Path::new(&*String::from_utf8_lossy(argv0))
            .file_name()
            .is_some_and(|n| n == exe)
    })
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; waits until it is gone.
pub fn stop(pid: i32, grace: Duration) {
    if pid <= 1 {
        return;
    }
    for (signal, wait) in [
        (libc::SIGTERM, grace),
        (libc::SIGKILL, Duration::from_secs(2)),
    ] {
        if !alive(pid) {
            return;
        }
        // SAFETY: kill(2) on a pid we started or found in one of our namespaces.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + wait;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads a pid file.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes `text` to `path` whole: a temporary file beside it (hidden: the agent's manifests
/// reader skips dot files), then rename.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("a file name")?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Whether bpffs is mounted on /sys/fs/bpf (the agents pin there).
pub fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        })
    })
}
