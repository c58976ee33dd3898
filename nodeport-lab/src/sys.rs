//! Commands, network namespaces and processes: the few system operations the lab is made of.
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
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
    spawn_in(ns, None, cmd, log)
}

/// [`spawn_in_netns`], and the process starts as a member of the cgroup v2 directory `cgroup`
/// (when given), as a container's processes start in its cgroup.
pub fn spawn_in(
    ns: &str,
    cgroup: Option<&Path>,
    cmd: &mut Command,
    log: &Path,
) -> anyhow::Result<i32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = spawn_entering(ns, cgroup, cmd, true)?;
    Ok(child.id() as i32)
}

/// Spawns `cmd` inside network namespace `ns` and, when given, cgroup `cgroup` (its stdio as
/// `cmd` says); `daemon` gives it its own session. Both are joined between fork and exec, so the
/// program's first instruction already runs there: cgroup membership is per process, so the
/// socket programs attached to a cgroup see every socket it makes.
pub fn spawn_entering(
    ns: &str,
    cgroup: Option<&Path>,
    cmd: &mut Command,
    daemon: bool,
) -> anyhow::Result<Child> {
    let netns = File::open(netns_path(ns)).with_context(|| format!("netns {ns}"))?;
    // Opened before the fork: the child may only make async-signal-safe calls.
    let procs = cgroup
        .map(|dir| {
            let path = dir.join("cgroup.procs");
            File::options()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        })
        .transpose()?;
    let fd = netns.as_raw_fd();
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: setns, write and setsid are async-signal-safe; both fds stay open until spawn
    // returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself (cgroup v2's cgroup.procs).
            if let Some(procs) = procs_fd
                && libc::write(procs, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if daemon {
                libc::setsid();
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| {
        let place = cgroup.map_or(String::new(), |c| format!(" (cgroup {})", c.display()));
        format!("starting {cmd:?} in {ns}{place}")
    })?;
    drop((netns, procs));
    Ok(child)
}

/// Where cgroup v2 is mounted (/sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
/// hybrid one), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_in(&text).context(
        "no cgroup v2 filesystem is mounted (/proc/self/mountinfo has no cgroup2 line): the lab \
         puts each node's processes in a cgroup v2 directory for the agent's socket load \
         balancing; mount one, e.g. `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none \
         /sys/fs/cgroup/unified`",
    )
}

/// The mount point of the first cgroup2 line of a mountinfo text (proc(5): fields up to a lone
/// `-`, then the filesystem type; the mount point is the fifth field, with octal escapes).
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        let mount_point = fields.get(4)?;
        (fields.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The processes of a cgroup and of every cgroup below it.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for child in cgroup_children(dir) {
        pids.extend(cgroup_pids(&child));
    }
    pids
}

fn cgroup_children(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Removes a cgroup directory and the cgroups below it (deepest first). A cgroup can only go
/// once it has no process, and a killed process leaves it asynchronously (after it is reaped,
/// the kernel still has to drop its css_set): rmdir says EBUSY meanwhile, so it is tried again
/// for up to `patience`.
pub fn cgroup_remove(dir: &Path, patience: Duration) -> anyhow::Result<()> {
    for child in cgroup_children(dir) {
        cgroup_remove(&child, patience)?;
    }
    let deadline = Instant::now() + patience;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (processes still in it: {:?})",
                        dir.display(),
                        cgroup_pids(dir)
                    )
                });
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_unified_or_hybrid() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // Optional fields (shared:N) sit before the separator.
        let unified =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let spaced = "50 23 0:40 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(spaced),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(cgroup2_mount_in(&hybrid.replace("cgroup2", "tmpfs")), None);
    }
}
