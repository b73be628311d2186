//! What goes through containerd's streaming server rather than a plain CRI call: exec with
//! stdin (`crictl exec -i`), exec with a terminal (`crictl exec -it`, under `script`), and
//! `crictl port-forward`. Each is checked under runc and microvm alike.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::cri::Cri;
use crate::common::{check, text, wait_until};
use crate::lifecycle::answer_at;

/// Streaming exec: a line through stdin and back; then a terminal: the process sees a pty, and
/// its output comes back through the terminal.
pub fn exec_checks(c: &Cri, ctr: &str) -> Result<(), String> {
    let mut cmd = c.crictl_cmd(&["exec", "-i", ctr, "/bin/sh", "-c", "read l; echo got:$l"]);
    let out = run_with_stdin(&mut cmd, Some(b"streamed\n"))?;
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    check(out.status.success() && got == "got:streamed", || {
        format!("crictl exec -i: {:?} {}", out.status, text(&out))
    })?;

    let mut argv = vec![c.crictl.display().to_string()];
    argv.extend(
        c.crictl_cmd(&["exec", "-it", ctr, "/bin/sh", "-c", "tty; echo tty-done"])
            .get_args()
            .map(|a| a.to_string_lossy().into_owned()),
    );
    // `script` gives crictl the terminal it wants on stdin and stdout.
    let line = argv
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"]);
    // Stdin stays open until crictl is done, as a person's terminal does: with a terminal,
    // containerd ends the client's output stream once its input ends (docker's behaviour).
    let out = run_with_stdin(&mut cmd, None)?;
    let got = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    check(
        out.status.success() && got.contains("/dev/pts/") && got.contains("tty-done"),
        || format!("crictl exec -it: {:?} {}", out.status, text(&out)),
    )
}

/// Runs `cmd` with `input` on its stdin, then closed; with `None`, stdin is held open (and
/// empty) until `cmd` ends. Killed after two minutes.
pub(crate) fn run_with_stdin(
    cmd: &mut Command,
    input: Option<&[u8]>,
) -> Result<std::process::Output, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut stdin = child.stdin.take();
    if let (Some(input), Some(mut w)) = (input, stdin.take()) {
        let _ = w.write_all(input);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stdin);
    child.wait_with_output().map_err(|e| e.to_string())
}

/// `crictl port-forward POD LOCAL:8080` (kubectl's port-forward, through containerd's streaming
/// server): a connection to the local port gets the pod's `pod-ok`; a port nothing in the pod
/// listens on gets a closed connection.
pub fn port_forward_checks(c: &Cri, pod: &str) -> Result<(), String> {
    // A local port of its own per containerd flavor (a previous scenario's may linger).
    let local = 18_480 + c.flavor as u16;
    let mut forward = c
        .crictl_cmd(&["port-forward", pod, &format!("{local}:8080"), "7:9"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("crictl port-forward: {e}"))?;
    let result = (|| {
        let mut got = None;
        wait_until(&format!("127.0.0.1:{local} to forward pod-ok"), 60, || {
            got = answer_at(&format!("127.0.0.1:{local}"));
            got.as_deref().is_some_and(|a| a.trim() == "pod-ok")
        })
        .map_err(|e| format!("{e} (last answer {got:?})"))?;
        // Last: crictl (like kubectl) gives up the whole forward after an error on one port.
        let closed = answer_at("127.0.0.1:7");
        check(closed.as_deref().is_none_or(str::is_empty), || {
            format!("port 9 of the pod, where nothing listens, answered {closed:?}")
        })
    })();
    let _ = forward.kill();
    let out = forward.wait_with_output().map_err(|e| e.to_string())?;
    result.map_err(|e| format!("{e}\ncrictl port-forward said: {}", text(&out)))
}
