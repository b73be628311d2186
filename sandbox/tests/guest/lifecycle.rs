//! The VM as a whole: sandbox settings, shared namespaces, mounts, drop, an agent panic.

use super::*;

pub(crate) fn panic_resets_the_vm(
    mut env: Env,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        // Test-only trigger: the agent panics 500 ms after answering the first Health (which
        // Sandbox::start waits for). The panic hook must reset the VM: the VMM exits by itself.
        env.cfg
            .kernel_params
            .push(KernelParam::new("microvm.agent_panic_after_health", "1"));
        let sb = boot(&env).await;
        let started = Instant::now();
        let status = sb
            .wait_exit(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("the VM did not end after the agent panicked: {e}"));
        eprintln!(
            "the VMM exited {:.2} s after the agent answered",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(status.code(), Some(0), "the VMM's exit after a guest reset");
        let console = std::fs::read_to_string(env.dir.join("console.log")).unwrap();
        assert!(
            console.contains("microvm-agent: PANIC: ") && console.contains("resetting the VM"),
            "the panic was not logged: {console}"
        );
    })
}

pub(crate) fn settings_and_drop(
    env: Env,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let sb = boot(&env).await;

        // Before any sharing: each container has its own IPC and PID namespaces (the
        // namespaces are compared while both containers run, so their inode numbers cannot be
        // reused in between).
        sb.create_container(&container("solo", spec(&["sleep", "1000"])))
            .await
            .unwrap();
        sb.start_container("solo", ProcessIo::default())
            .await
            .unwrap();
        let (code, solo_ns) = exec_text(&sb, "solo", "ns", &["sh", "-c", NS_LINKS]).await;
        assert_eq!(code, 0);
        let (code, other_ns, _) = run(&sb, "solo2", &["sh", "-c", NS_LINKS], None).await;
        assert_eq!(code, 0);
        let (solo_ipc, other_ipc) = (solo_ns.lines().next(), other_ns.lines().next());
        assert!(
            solo_ipc.is_some_and(|l| l.starts_with("ipc:[")),
            "{solo_ns:?}"
        );
        assert_ne!(solo_ipc, other_ipc, "IPC namespaces without sharing");
        assert_ne!(
            solo_ns.lines().nth(1),
            other_ns.lines().nth(1),
            "PID namespaces without sharing"
        );
        sb.remove_container("solo").await.unwrap();

        let settings = SandboxSettings {
            hostname: "sbx-test".into(),
            dns_servers: vec!["10.0.2.3".into()],
            dns_search: vec!["example.test".into()],
            sysctls: [("kernel.domainname".to_string(), "microvm.test".to_string())].into(),
            mounts: vec![Mount {
                source: "/dev/vda".into(),
                destination: "/run/images/busybox".into(),
                fstype: "ext4".into(),
                options: vec!["ro".into()],
            }],
            share_pid_namespace: true,
            share_ipc_namespace: true,
            ..Default::default()
        };
        sb.create_sandbox(&settings).await.unwrap();

        // Pod semantics: the containers created from now on share one PID and one IPC
        // namespace. pod-b's `ps` (its own /proc, in the shared PID namespace) sees pod-a's
        // sleep, and both see the same namespace links.
        sb.create_container(&container("pod-a", spec(&["sleep", "4242"])))
            .await
            .unwrap();
        sb.start_container("pod-a", ProcessIo::default())
            .await
            .unwrap();
        let (code, a_ns) = exec_text(&sb, "pod-a", "ns", &["sh", "-c", NS_LINKS]).await;
        assert_eq!(code, 0);
        let (code, b_out, b_err) = run(
            &sb,
            "pod-b",
            &["sh", "-c", &format!("{NS_LINKS}; ps -o pid,args")],
            None,
        )
        .await;
        assert_eq!(code, 0, "pod-b: {b_out:?} {b_err:?}");
        let b_ns: Vec<&str> = b_out.lines().take(2).collect();
        assert_eq!(
            a_ns.lines().collect::<Vec<_>>(),
            b_ns,
            "shared IPC and PID namespace links"
        );
        assert_ne!(
            b_ns.first().copied(),
            solo_ipc,
            "a new, shared IPC namespace"
        );
        assert!(
            b_out.lines().any(|l| l.trim_end().ends_with("sleep 4242")),
            "pod-b's ps does not show pod-a's sleep: {b_out}"
        );
        // pod-a's sleep is not PID 1 there: the namespace holder is.
        assert!(
            !b_out
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "sleep", "4242"]),
            "{b_out}"
        );
        sb.remove_container("pod-a").await.unwrap();
        // Asking again for what is shared is fine; asking for more is not possible.
        sb.create_sandbox(&SandboxSettings {
            share_ipc_namespace: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let bad = SandboxSettings {
            sysctls: [("../etc/x".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let err = sb.create_sandbox(&bad).await.err().unwrap();
        assert_eq!(err.code(), Some(Code::INVALID_ARGUMENT), "{err}");

        // No UTS namespace: the container sees the sandbox's hostname. A read-only directory
        // rootfs (the sandbox mount) with a tmpfs mounted at /data.
        let spec_json = spec_with(
            &[
                "sh",
                "-c",
                "hostname; cat /etc/resolv.conf; cat /proc/sys/kernel/domainname; \
                 echo hi > /data/f && cat /data/f; \
                 if echo x > /x 2>/dev/null; then echo ROOT-WRITABLE; else echo ROOT-RO; fi",
            ],
            &["pid", "ipc", "mount"],
            json!({"mounts": [{"destination": "/etc/resolv.conf", "type": "bind",
                               "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}]}),
        );
        let cfg = ContainerConfig {
            id: "dir".into(),
            spec_json,
            rootfs: Rootfs {
                source: RootfsSource::Directory("/run/images/busybox".into()),
                writable: false,
            },
            mounts: vec![Mount {
                source: "tmpfs".into(),
                destination: "/data".into(),
                fstype: "tmpfs".into(),
                options: vec!["size=1m".into()],
            }],
        };
        sb.create_container(&cfg).await.unwrap();
        let (out_w, out) = capture();
        let (err_w, err) = capture();
        let p = sb
            .start_container(
                "dir",
                ProcessIo {
                    stdout: Some(out_w),
                    stderr: Some(err_w),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let code = p.wait().await.unwrap().code;
        let (out, err) = (out.text(), err.text());
        assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
        assert_eq!(
            out, "sbx-test\nsearch example.test\nnameserver 10.0.2.3\nmicrovm.test\nhi\nROOT-RO\n",
            "stderr {err:?}"
        );
        sb.remove_container("dir").await.unwrap();
        // The id can be used again once removed.
        let (code, out, _) = run(&sb, "dir", &["echo", "reused"], None).await;
        assert_eq!((code, out.as_str()), (0, "reused\n"));

        // Dropping the sandbox kills and reaps the VMM and removes its sockets.
        let pid = sb.vmm_pid().unwrap() as i32;
        let socket = sb.vsock_path().to_path_buf();
        assert!(socket.exists());
        drop(sb);
        // SAFETY: kill with signal 0 only checks that the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "the VMM {pid} still exists after drop");
        assert!(!socket.exists(), "the vsock socket was not removed");
        let _ = env.dir;
    })
}
