//! Containers and processes: stdio, exit codes, exec, signals, terminals, stats, OOM.

use super::*;

pub(crate) fn basics(env: Env) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let sb = boot(&env).await;
        let v = sb.version().await.unwrap();
        assert_eq!(
            v.protocol_version,
            sandbox::agent_protocol::PROTOCOL_VERSION
        );
        assert!(
            !v.agent_version.is_empty() && v.kernel_release.starts_with("6."),
            "{v:?}"
        );
        assert!(sb.health().await.unwrap() > Duration::ZERO);
        assert!(
            sb.console_tail().contains("guest boot marker 1 at"),
            "the agent's ready marker was not logged by the VMM"
        );

        // stdout and stderr arrive separately; exit 0.
        let (code, out, err) = run(
            &sb,
            "echo",
            &["sh", "-c", "echo hello; echo oops >&2"],
            None,
        )
        .await;
        assert_eq!((code, out.as_str(), err.as_str()), (0, "hello\n", "oops\n"));

        // An exit code.
        let (code, _, _) = run(&sb, "three", &["sh", "-c", "exit 3"], None).await;
        assert_eq!(code, 3);

        // 10 MiB through stdout, intact, all there when wait returns.
        let mib: usize = std::env::var("AGENT_TEST_MIB").map_or(10, |v| v.parse().unwrap());
        let n = mib << 20;
        let started = Instant::now();
        sb.create_container(&container(
            "big",
            spec(&["sh", "-c", &format!("yes 0123456789abcdef | head -c {n}")]),
        ))
        .await
        .unwrap();
        let (out_w, out) = capture();
        let p = sb
            .start_container(
                "big",
                ProcessIo {
                    stdout: Some(out_w),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let exit = p.wait().await.unwrap();
        assert_eq!(exit.code, 0);
        let got = out.bytes();
        let want: Vec<u8> = b"0123456789abcdef\n"
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect();
        assert_eq!(got.len(), n, "bytes of stdout");
        assert_eq!(fnv1a(&got), fnv1a(&want), "stdout checksum");
        eprintln!("{mib} MiB stdout: {:.2} s", started.elapsed().as_secs_f64());
        sb.remove_container("big").await.unwrap();

        // stdin piped through cat.
        let input: Vec<u8> = (0..(1u32 << 20))
            .map(|i| {
                if i % 61 == 60 {
                    b'\n'
                } else {
                    (i % 94 + 33) as u8
                }
            })
            .collect();
        let (code, out, _) = run(&sb, "cat", &["cat"], Some(input.clone())).await;
        assert_eq!(code, 0);
        assert_eq!(out.len(), input.len(), "bytes through cat");
        assert!(out.as_bytes() == input.as_slice(), "cat changed the data");

        // A missing executable: a precise error, exit code 127, and the agent keeps serving.
        sb.create_container(&container("nope", spec(&["/bin/nope"])))
            .await
            .unwrap();
        let err = sb
            .start_container("nope", ProcessIo::default())
            .await
            .err()
            .expect("starting /bin/nope must fail");
        assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");
        assert!(err.to_string().contains("/bin/nope"), "{err}");
        assert_eq!(sb.wait("nope", "").await.unwrap().code, 127);
        sb.remove_container("nope").await.unwrap();
        // A spec that is not JSON, and an unknown container.
        let mut bad = container("bad", b"{not json".to_vec());
        let err = sb.create_container(&bad).await.expect_err("bad JSON");
        assert_eq!(err.code(), Some(Code::INVALID_ARGUMENT), "{err}");
        bad.spec_json = spec(&["true"]);
        bad.rootfs.source = RootfsSource::Block {
            path: "/dev/vdz".into(),
            fstype: "ext4".into(),
            options: vec![],
        };
        let err = sb.create_container(&bad).await.expect_err("no such disk");
        assert!(err.to_string().contains("/dev/vdz"), "{err}");
        let err = sb
            .start_container("ghost", ProcessIo::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");
        let (code, out, _) = run(&sb, "again", &["echo", "still-serving"], None).await;
        assert_eq!((code, out.as_str()), (0, "still-serving\n"));

        shutdown(sb).await;
    })
}

pub(crate) fn exec_and_signals(
    env: Env,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let sb = boot(&env).await;
        sb.create_container(&container("svc", spec(&["sleep", "1000"])))
            .await
            .unwrap();
        let init = sb
            .start_container("svc", ProcessIo::default())
            .await
            .unwrap();
        let init_pid = init.pid;
        let pids = sb.list_processes("svc").await.unwrap();
        assert!(pids.contains(&init_pid), "{pids:?} lacks {init_pid}");

        // Exec: output and exit code.
        let proc_json = |args: &[&str], terminal: bool| {
            serde_json::to_vec(&json!({
                "terminal": terminal,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/bin:/sbin"],
                "cwd": "/",
            }))
            .unwrap()
        };
        let (out_w, out) = capture();
        let p = sb
            .exec(
                "svc",
                "e1",
                &proc_json(&["sh", "-c", "echo exec-ok; exit 7"], false),
                ProcessIo {
                    stdout: Some(out_w),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(p.wait().await.unwrap().code, 7);
        assert_eq!(out.text(), "exec-ok\n");

        // Stats of the running container.
        let st = sb.stats("svc").await.unwrap();
        assert!(st.pids_current >= 1 && st.memory_usage > 0, "{st:?}");

        // CloseStdin: cat ends although the host keeps its end open.
        let (stdin_r, mut stdin_w) = std::io::pipe().unwrap();
        let (out_w, out) = capture();
        let p = sb
            .exec(
                "svc",
                "cat",
                &proc_json(&["cat"], false),
                ProcessIo {
                    stdin: Some(stdin_r.into()),
                    stdout: Some(out_w),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        stdin_w.write_all(b"abc").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sb.close_stdin("svc", "cat").await.unwrap();
        assert_eq!(p.wait().await.unwrap().code, 0);
        assert_eq!(out.text(), "abc");
        drop(stdin_w);

        // A terminal: its size, a resize, input echoed.
        let (tin_r, mut tin_w) = std::io::pipe().unwrap();
        let (tout_r, tout_w) = std::io::pipe().unwrap();
        let p = sb
            .exec(
                "svc",
                "tty",
                &proc_json(
                    &[
                        "sh",
                        "-c",
                        "stty size; read x; stty size; [ -t 0 ] && [ -t 1 ] && echo IS-A-TTY",
                    ],
                    true,
                ),
                ProcessIo {
                    stdin: Some(tin_r.into()),
                    stdout: Some(tout_w.into()),
                    terminal: Some(WindowSize {
                        rows: 30,
                        cols: 100,
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut r = tout_r;
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = r.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    return seen;
                }
                seen.extend_from_slice(&buf[..n]);
            }
        });
        // Wait for the first size line before resizing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        sb.resize_pty(
            "svc",
            "tty",
            WindowSize {
                rows: 40,
                cols: 120,
            },
        )
        .await
        .unwrap();
        tin_w.write_all(b"go\n").unwrap();
        assert_eq!(p.wait().await.unwrap().code, 0);
        let text = String::from_utf8_lossy(&reader.join().unwrap()).replace('\r', "");
        assert!(text.contains("30 100\n"), "terminal output: {text:?}");
        assert!(
            text.contains("40 120\n"),
            "terminal output after resize: {text:?}"
        );
        assert!(
            text.contains("IS-A-TTY"),
            "stdin and stdout are a terminal: {text:?}"
        );
        // A process without a terminal cannot be resized.
        let err = sb
            .resize_pty("svc", "", WindowSize { rows: 1, cols: 1 })
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Some(Code::FAILED_PRECONDITION), "{err}");

        // Signal forwarding: SIGUSR1 raised here reaches the exec'd shell, which traps it.
        let (out_w, out) = capture();
        let p = sb
            .exec(
                "svc",
                "trap",
                &proc_json(
                    &["sh", "-c", "trap 'echo got-usr1; exit 42' USR1; echo ready; while true; do sleep 0.1; done"],
                    false,
                ),
                ProcessIo { stdout: Some(out_w), ..Default::default() },
            )
            .await
            .unwrap();
        let fwd = sb.forward_signals("svc", "trap").unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        // SAFETY: raising a signal this process handles (forward_signals installed handlers).
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(p.wait().await.unwrap().code, 42);
        fwd.abort();
        assert_eq!(out.text(), "ready\ngot-usr1\n");

        // Killing the workload: 137.
        sb.signal("svc", "", libc::SIGKILL, false).await.unwrap();
        assert_eq!(init.wait().await.unwrap().code, 137);
        let err = sb
            .signal("svc", "", libc::SIGTERM, false)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");
        sb.remove_container("svc").await.unwrap();
        let err = sb.stats("svc").await.err().unwrap();
        assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");

        // Out of memory: 16 MiB limit, a 64 MiB buffer.
        let oom_spec = spec_with(
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            &["pid", "ipc", "uts", "mount"],
            json!({"resources": {"memory": {"limit": 16 << 20}}}),
        );
        sb.create_container(&container("hog", oom_spec))
            .await
            .unwrap();
        let st = sb.stats("hog").await.unwrap();
        assert_eq!(st.memory_limit, Some(16 << 20));
        let p = sb
            .start_container("hog", ProcessIo::default())
            .await
            .unwrap();
        assert_eq!(p.wait().await.unwrap().code, 137);
        let ev = tokio::time::timeout(Duration::from_secs(10), sb.next_oom_event())
            .await
            .expect("an OOM event")
            .unwrap();
        assert_eq!(ev.container_id, "hog");
        assert!(ev.oom_kill_count >= 1);
        assert!(sb.stats("hog").await.unwrap().oom_kill_count >= 1);
        sb.remove_container("hog").await.unwrap();

        // Device rules: a /dev/kmsg node (c 1:11) exists in the container but no rule allows
        // it, so opening it is EPERM; /dev/null is on the default list. Enforced by a BPF
        // program on the container's cgroup, which needs a guest kernel with bpf()
        // (CONFIG_BPF_SYSCALL, seen as /proc/sys/kernel/unprivileged_bpf_disabled); with an
        // older kernel the device is reachable, and that is checked instead.
        let devices_spec = spec_with(
            &[
                "sh",
                "-c",
                "test -e /proc/sys/kernel/unprivileged_bpf_disabled && echo kernel-has-bpf; \
                 echo x > /dev/null && echo null:ok; \
                 echo guest-device-rules-test > /dev/kmsg2 && echo kmsg:opened; true",
            ],
            &["pid", "ipc", "uts", "mount"],
            json!({
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "devices": [{"path": "/dev/kmsg2", "type": "c", "major": 1, "minor": 11,
                             "fileMode": 438}],
            }),
        );
        sb.create_container(&container("devs", devices_spec))
            .await
            .unwrap();
        let (out_w, out) = capture();
        let (err_w, err) = capture();
        let p = sb
            .start_container(
                "devs",
                ProcessIo {
                    stdout: Some(out_w),
                    stderr: Some(err_w),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(p.wait().await.unwrap().code, 0);
        let (out, err) = (out.text(), err.text());
        if out.starts_with("kernel-has-bpf\n") {
            assert_eq!(out, "kernel-has-bpf\nnull:ok\n", "stderr {err:?}");
            assert!(
                err.contains("/dev/kmsg2: Operation not permitted"),
                "opening a device no rule allows: {err:?}"
            );
        } else {
            eprintln!("NOTE: this guest kernel has no bpf(): device rules are not enforced");
            assert_eq!(out, "null:ok\nkmsg:opened\n", "stderr {err:?}");
        }
        sb.remove_container("devs").await.unwrap();

        shutdown(sb).await;
    })
}
