//! Several containers in one pod VM.

use std::io::Write;
use std::process::Stdio;

use crate::common::host::{processes_with_arg, shim_pids, state_open_to_others, vmm_pids};
use crate::common::{check, text, wait_until, Containerd, EventLog};

/// Two containers with one sandbox-id annotation: one shim, one VMM, the pod's state and the
/// shim's socket private to root; removing the first leaves the second running; removing the
/// second ends the VM.
pub fn pod_of_two(c: &Containerd) -> Result<(), String> {
    let ann = "io.kubernetes.cri.sandbox-id=pod1";
    let vmms_before = vmm_pids().len();
    let r = (|| {
        for id in ["pod1", "pod1-b"] {
            let out = c.ctr(&c.run_args(&["-d", "--annotation", ann], id, &["sleep", "1000"]));
            check(out.status.success(), || {
                format!("ctr run -d {id}: {}", text(&out))
            })?;
            c.wait_status(id, "RUNNING")?;
        }
        let vmms = vmm_pids().len() - vmms_before;
        check(vmms == 1, || format!("{vmms} VMMs for one pod"))?;
        check(shim_pids().len() == 1, || {
            format!("shims: {:?}", shim_pids())
        })?;
        let open = state_open_to_others();
        check(open.is_empty(), || {
            format!("pod state open to group or others: {open:?}")
        })?;
        c.remove("pod1");
        let out = c.ctr(&["task", "exec", "--exec-id", "x", "pod1-b", "echo", "alive"]);
        check(text(&out).contains("alive"), || {
            format!("second container after the first left: {}", text(&out))
        })?;
        check(vmm_pids().len() - vmms_before == 1, || {
            "the VM went away with the first container".into()
        })?;
        c.remove("pod1-b");
        wait_until("the pod's VMM to end", 60, || {
            vmm_pids().len() == vmms_before
        })
    })();
    c.remove("pod1");
    c.remove("pod1-b");
    r
}

/// `ctr run --rm --log-uri URI` in the pod of a container printing to stdout and stderr.
fn run_with_log_uri(c: &Containerd, pod: &str, id: &str, uri: &str) -> Result<(), String> {
    let out = c.ctr(&c.run_args(
        &["--rm", "--annotation", pod, "--log-uri", uri],
        id,
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
    ));
    check(out.status.success(), || {
        format!("ctr run --log-uri {uri}: {}", text(&out))
    })
}

/// One pod VM for: its size from CRI's sandbox annotations (MemTotal, nproc in the guest);
/// an OOM kill under `--memory-limit` (exit 137, `/tasks/oom` before `/tasks/exit`, the output
/// printed before the kill arrives); `--log-uri file://` and `binary://` (a logger script).
pub fn pod_size_oom_logs(c: &Containerd) -> Result<(), String> {
    let pod = "io.kubernetes.cri.sandbox-id=pod2";
    let events = EventLog::start(c)?;
    let r = (|| {
        // The first container sizes the VM: 256 MiB (shim config) + 128 MiB, 1 + 1 vCPU.
        let out = c.ctr(&c.run_args(
            &[
                "-d",
                "--annotation",
                pod,
                "--annotation",
                "io.kubernetes.cri.sandbox-memory=134217728",
                "--annotation",
                "io.kubernetes.cri.sandbox-cpu-quota=50000",
                "--annotation",
                "io.kubernetes.cri.sandbox-cpu-period=100000",
            ],
            "pod2",
            &["sleep", "1000"],
        ));
        check(out.status.success(), || {
            format!("ctr run -d pod2: {}", text(&out))
        })?;
        c.wait_status("pod2", "RUNNING")?;
        let out = c.exec_sh("size", "pod2", "nproc; grep MemTotal /proc/meminfo");
        let size = text(&out);
        let mut words = size.split_whitespace();
        let nproc = words.next().and_then(|w| w.parse::<u32>().ok());
        let mem_kib = words.nth(1).and_then(|w| w.parse::<u64>().ok());
        check(nproc == Some(2), || format!("nproc in the pod VM: {size}"))?;
        // MemTotal is the RAM less what the kernel keeps: above 256 MiB, at most 384 MiB.
        check(
            mem_kib.is_some_and(|k| k > 300 << 10 && k <= 384 << 10),
            || format!("MemTotal of a 384 MiB pod VM: {size}"),
        )?;

        // OOM: dd's 64 MiB buffer under a 32 MiB limit. dd is the container's init (exec),
        // so its SIGKILL is the task's exit.
        let out = c.ctr(&c.run_args(
            &["--rm", "--annotation", pod, "--memory-limit", "33554432"],
            "pod2-oom",
            &[
                "sh",
                "-c",
                "echo before; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
            ],
        ));
        check(out.status.code() == Some(137), || {
            format!(
                "OOM-killed container exited {:?}: {}",
                out.status,
                text(&out)
            )
        })?;
        check(
            String::from_utf8_lossy(&out.stdout).contains("before"),
            || format!("output before the OOM kill lost: {}", text(&out)),
        )?;

        // file://: both streams appended to the file.
        let log = c.dir.join("logs/file.log");
        run_with_log_uri(c, pod, "pod2-file", &format!("file://{}", log.display()))?;
        wait_until("the file:// log", 30, || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            t.contains("to-stdout\n") && t.contains("to-stderr\n")
        })
        .map_err(|e| format!("{e}: {:?}", std::fs::read_to_string(&log)))?;

        // binary://: a logger script (fd 3 stdout, fd 4 stderr, fd 5 ready).
        let script = c.dir.join("logger.sh");
        let bin_out = c.dir.join("binary.log");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 echo \"id=$CONTAINER_ID ns=$CONTAINER_NAMESPACE $1=$2\" > {o}.env\n\
                 exec 5>&-\n\
                 /bin/cat <&3 > {o}.stdout &\n\
                 /bin/cat <&4 > {o}.stderr\n\
                 wait\n",
                o = bin_out.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        run_with_log_uri(
            c,
            pod,
            "pod2-bin",
            &format!("binary://{}?tag=web", script.display()),
        )?;
        let read = |ext: &str| {
            std::fs::read_to_string(format!("{}.{ext}", bin_out.display())).unwrap_or_default()
        };
        wait_until("the logging binary's files", 30, || {
            read("stdout") == "to-stdout\n" && read("stderr") == "to-stderr\n"
        })
        .map_err(|e| {
            format!(
                "{e}: stdout {:?} stderr {:?} env {:?}",
                read("stdout"),
                read("stderr"),
                read("env")
            )
        })?;
        check(read("env") == "id=pod2-bin ns=default tag=web\n", || {
            format!(
                "logging binary's environment and arguments: {:?}",
                read("env")
            )
        })?;
        wait_until("the logging binary to end", 30, || {
            !processes_with_arg(&script.to_string_lossy())
        })?;

        // stdin: ctr writes its stdin into the FIFO and, at its end, calls CloseIO, which must
        // close the process's stdin in the guest; otherwise `cat` never ends (ctr_cmd's
        // `timeout` would fail the test).
        let mut child = c
            .ctr_cmd(&c.run_args(
                &["--rm", "--annotation", pod],
                "pod2-stdin",
                &["sh", "-c", "cat; echo stdin-closed"],
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(b"line-one\nline-two\n")
            .map_err(|e| e.to_string())?;
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        check(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout) == "line-one\nline-two\nstdin-closed\n",
            || format!("ctr run -i with piped stdin: {}", text(&out)),
        )
    })();
    c.remove("pod2");
    let (log, topics) = events.topics("pod2-oom")?;
    r?;
    let oom = topics.iter().position(|t| t == "/tasks/oom");
    let exit = topics.iter().position(|t| t == "/tasks/exit");
    check(oom.is_some() && exit.is_some() && oom < exit, || {
        format!("task events of pod2-oom (want /tasks/oom before /tasks/exit): {topics:?}\n{log}")
    })
}
