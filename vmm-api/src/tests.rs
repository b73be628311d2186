use super::*;

fn full() -> VmConfig {
    VmConfig {
        kernel: "/k/vmlinux".into(),
        initrd: Some("/k/initrd.cpio".into()),
        cmdline: KernelCmdline::with_params(vec![
            KernelParam::new("RUST_LOG", "debug"),
            KernelParam::flag("microvm.flag"),
        ]),
        vcpus: 2,
        memory_mib: 256,
        disks: vec![
            DiskConfig {
                path: "/d/root.ext4".into(),
                read_only: true,
                rate_limit: None,
            },
            DiskConfig {
                path: "/d/data.ext4".into(),
                read_only: false,
                rate_limit: Some(RateLimitConfig {
                    bandwidth: Some(TokenBucketConfig {
                        size: 1 << 20,
                        one_time_burst: Some(8 << 20),
                        refill_time_ms: 100,
                    }),
                    ops: Some(TokenBucketConfig::new(100, 1000)),
                }),
            },
        ],
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/run/s/vsock.sock".into(),
        }),
        rng: true,
        nets: vec![NetConfig {
            tap_name: "tap0".into(),
            mac: [0x02, 0, 1, 2, 3, 4],
            mtu: 1500,
        }],
        fs: vec![FsConfig {
            tag: "microvm".into(),
            socket: "/run/s/virtiofs.sock".into(),
        }],
        force: true,
        seccomp: SeccompMode::Log,
        jail: Some(JailConfig {
            uid: 900_001,
            gid: 900_001,
            cgroup: Some("/sys/fs/cgroup/microvm/vm900001".into()),
        }),
    }
}

/// The message of the error `json` is refused with.
fn refused(json: &str) -> String {
    VmConfig::from_json(json.as_bytes())
        .expect_err(json)
        .to_string()
}

/// The message of the error `change` applied to a valid config is refused with.
fn invalid(change: impl FnOnce(&mut VmConfig)) -> String {
    let mut c = full();
    change(&mut c);
    let msg = c.validate().expect_err("must be refused").to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    // The VMM's reader refuses it the same way.
    let json = serde_json::to_vec(&c).unwrap();
    assert_eq!(VmConfig::from_json(&json).unwrap_err().to_string(), msg);
    msg
}

#[test]
fn round_trip() {
    let c = full();
    let json = c.to_json().unwrap();
    assert_eq!(VmConfig::from_json(&json).unwrap(), c);
    assert_eq!(VmConfig::from_reader(&json[..]).unwrap(), c);
    let minimal = VmConfig::new("/k/vmlinux");
    assert_eq!(
        VmConfig::from_json(&minimal.to_json().unwrap()).unwrap(),
        minimal
    );
}

#[test]
fn omitted_fields_take_the_defaults() {
    let c = VmConfig::from_json(br#"{"kernel": "/vmlinux"}"#).unwrap();
    assert_eq!(c, VmConfig::new("/vmlinux"));
    assert_eq!((c.vcpus, c.memory_mib), (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB));
    assert!(!c.force && !c.rng && c.disks.is_empty() && c.vsock.is_none());
    assert_eq!(
        c.seccomp,
        SeccompMode::Enforce,
        "seccomp is never off by default"
    );
    let d = VmConfig::from_json(br#"{"kernel": "/k", "disks": [{"path": "/d"}]}"#).unwrap();
    assert!(!d.disks[0].read_only);
}

#[test]
fn unknown_fields_are_refused_at_every_level() {
    let msg = refused(r#"{"kernel": "/k", "cpus": 2}"#);
    assert!(msg.contains("unknown field `cpus`"), "{msg}");
    let msg = refused(r#"{"kernel": "/k", "disks": [{"path": "/d", "ro": true}]}"#);
    assert!(msg.contains("unknown field `ro`"), "{msg}");
    let msg = refused(r#"{"kernel": "/k", "vsock": {"guest_cid": 3, "uds_path": "/s", "x": 1}}"#);
    assert!(msg.contains("unknown field `x`"), "{msg}");
    let msg = refused(r#"{"kernel": "/k", "cmdline": {"append": "x"}}"#);
    assert!(msg.contains("unknown field `append`"), "{msg}");
    let msg = refused(r#"{"kernel": "/k", "cmdline": {"params": [{"key": "a", "val": "b"}]}}"#);
    assert!(msg.contains("unknown field `val`"), "{msg}");
}

#[test]
fn seccomp_mode_is_one_of_three_names() {
    for (name, mode) in [
        ("enforce", SeccompMode::Enforce),
        ("log", SeccompMode::Log),
        ("off", SeccompMode::Off),
    ] {
        let json = format!(r#"{{"kernel": "/k", "seccomp": "{name}"}}"#);
        assert_eq!(VmConfig::from_json(json.as_bytes()).unwrap().seccomp, mode);
    }
    for bad in ["Enforce", "trap", ""] {
        let msg = refused(&format!(r#"{{"kernel": "/k", "seccomp": "{bad}"}}"#));
        assert!(msg.contains("unknown variant"), "{bad}: {msg}");
    }
    for bad in ["false", "0", "null"] {
        refused(&format!(r#"{{"kernel": "/k", "seccomp": {bad}}}"#));
    }
}

#[test]
fn malformed_json_and_missing_kernel_are_refused() {
    assert!(refused(r#"{"kernel": "/k""#).contains("not valid"));
    assert!(refused(r#"{"vcpus": 1}"#).contains("missing field `kernel`"));
    assert!(refused(r#"{"kernel": "/k", "vcpus": 300}"#).contains("u8"));
}

#[test]
fn the_jail_asks_for_unprivileged_ids_and_a_cgroup_beneath_the_hierarchy() {
    let jail = |c: &mut VmConfig| c.jail.as_mut().unwrap().clone();
    assert_eq!(
        invalid(|c| c.jail.as_mut().unwrap().uid = 0),
        "jail.uid must be an unprivileged id (not 0 or 4294967295), not 0"
    );
    assert!(invalid(|c| c.jail.as_mut().unwrap().gid = u32::MAX).starts_with("jail.gid must be"));
    for cgroup in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/../../etc",
        "/sys/fs/cgroupx/vm",
        "/tmp/vm",
    ] {
        let msg = invalid(|c| c.jail.as_mut().unwrap().cgroup = Some(cgroup.into()));
        assert!(
            msg.starts_with("jail.cgroup must be a directory beneath"),
            "{cgroup}: {msg}"
        );
    }
    assert!(
        invalid(|c| c.jail.as_mut().unwrap().cgroup = Some("cg".into()))
            .starts_with("jail.cgroup must be an absolute path")
    );
    let mut c = full();
    let mut without_cgroup = jail(&mut c);
    without_cgroup.cgroup = None;
    c.jail = Some(without_cgroup);
    c.validate().unwrap();
    let msg = refused(r#"{"kernel": "/k", "jail": {"uid": 5, "gid": 5, "caps": []}}"#);
    assert!(msg.contains("unknown field `caps`"), "{msg}");
}

#[test]
fn vcpus_are_1_to_32() {
    assert_eq!(invalid(|c| c.vcpus = 0), "vcpus must be 1 to 32, not 0");
    assert_eq!(invalid(|c| c.vcpus = 33), "vcpus must be 1 to 32, not 33");
    let mut c = full();
    c.vcpus = MAX_VCPUS;
    c.validate().unwrap();
}

#[test]
fn memory_has_bounds() {
    assert_eq!(
        invalid(|c| c.memory_mib = 15),
        "memory_mib must be 16 to 1048576, not 15"
    );
    assert!(invalid(|c| c.memory_mib = MAX_MEMORY_MIB + 1).starts_with("memory_mib must be"));
    let mut c = full();
    c.memory_mib = MIN_MEMORY_MIB;
    c.validate().unwrap();
}

#[test]
fn paths_must_be_absolute() {
    assert_eq!(
        invalid(|c| c.kernel = "vmlinux".into()),
        "kernel must be an absolute path, not \"vmlinux\""
    );
    assert!(invalid(|c| c.initrd = Some("i.cpio".into())).starts_with("initrd must be"));
    assert!(invalid(|c| c.disks[1].path = "d.img".into()).starts_with("disks[1].path must be"));
    assert!(
        invalid(|c| c.vsock.as_mut().unwrap().uds_path = "v.sock".into())
            .starts_with("vsock.uds_path must be")
    );
    assert!(invalid(|c| c.kernel = "".into()).starts_with("kernel must be an absolute path"));
}

#[test]
fn paths_without_nul_and_not_too_long() {
    assert_eq!(
        invalid(|c| c.disks[0].path = "/d/a\0b".into()),
        "disks[0].path must not contain a NUL byte"
    );
    let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
    assert_eq!(
        invalid(|c| c.kernel = long.into()),
        "kernel is longer than 4095 bytes"
    );
    let socket = format!("/{}", "s".repeat(MAX_UDS_PATH_BYTES));
    assert_eq!(
        invalid(|c| c.vsock.as_mut().unwrap().uds_path = socket.into()),
        "vsock.uds_path is longer than 107 bytes"
    );
}

#[test]
fn disks_and_devices_are_limited() {
    let disk = DiskConfig {
        path: "/d".into(),
        read_only: true,
        rate_limit: None,
    };
    assert_eq!(
        invalid(|c| c.disks = vec![disk.clone(); MAX_DISKS + 1]),
        "at most 19 disks, not 20"
    );
    // 16 disks with vsock, rng, a net and an fs device: 20 devices for 19 IRQ lines.
    assert_eq!(
        invalid(|c| c.disks = vec![disk.clone(); MAX_VIRTIO_DEVICES - 3]),
        "at most 19 virtio devices (disks, vsock, rng, nets, fs), not 20"
    );
    let mut c = full();
    c.disks = vec![disk; MAX_VIRTIO_DEVICES - 4];
    c.validate().unwrap();
}

#[test]
fn guest_cid_is_3_to_2_pow_32_minus_2() {
    for bad in [0, 2, u64::from(u32::MAX), u64::MAX] {
        let msg = invalid(|c| c.vsock.as_mut().unwrap().guest_cid = bad);
        assert_eq!(
            msg,
            format!("vsock.guest_cid must be 3 to 4294967294, not {bad}")
        );
    }
}

#[test]
fn net_devices_are_checked() {
    for bad in ["", "a/b", "a:b", "a b", ".", "..", "sixteen-bytes-xx"] {
        assert_eq!(
            invalid(|c| c.nets[0].tap_name = bad.into()),
            format!("tap name {bad:?} must be 1 to 15 bytes without '/', ':' or whitespace")
        );
    }
    assert_eq!(
        invalid(|c| c.nets[0].mac[0] = 0x03),
        "the MAC address of tap \"tap0\" must be unicast (first byte even)"
    );
    assert_eq!(
        invalid(|c| c.nets[0].mtu = 67),
        "the MTU of tap \"tap0\" must be 68 to 65535, not 67"
    );
    let n = VmConfig::from_json(
        br#"{"kernel": "/k", "nets": [{"tap_name": "t", "mac": [2, 0, 0, 0, 0, 1]}]}"#,
    )
    .unwrap();
    assert_eq!(n.nets[0].mtu, 1500);
    let msg = refused(r#"{"kernel": "/k", "nets": [{"tap_name": "t", "mac": [2, 0, 0, 0, 0]}]}"#);
    assert!(msg.contains("array of length 6"), "{msg}");
}

#[test]
fn fs_devices_are_checked() {
    for bad in ["", "t\0g", &"t".repeat(MAX_FS_TAG_BYTES + 1)] {
        assert_eq!(
            invalid(|c| c.fs[0].tag = bad.into()),
            format!("virtio-fs tag {bad:?} must be 1 to 36 bytes without NUL")
        );
    }
    assert!(invalid(|c| c.fs[0].socket = "v.sock".into()).starts_with("fs.socket must be"));
    let mut c = full();
    c.fs[0].tag = "t".repeat(MAX_FS_TAG_BYTES);
    c.validate().unwrap();
}

#[test]
fn cmdline_is_the_defaults_plus_typed_params() {
    assert_eq!(KernelCmdline::default().render(), DEFAULT_CMDLINE);
    assert_eq!(
        full().cmdline.render(),
        format!("{DEFAULT_CMDLINE} RUST_LOG=debug microvm.flag")
    );
    let replaced = KernelCmdline {
        base: Some("console=hvc0".into()),
        params: vec![KernelParam::new("init", "/bin/sh")],
    };
    assert_eq!(replaced.render(), "console=hvc0 init=/bin/sh");
    let empty_base = KernelCmdline {
        base: Some(String::new()),
        params: vec![KernelParam::flag("quiet")],
    };
    assert_eq!(empty_base.render(), "quiet");
}

#[test]
fn cmdline_params_cannot_smuggle_words() {
    assert_eq!(
        invalid(|c| c.cmdline.params[0].value = Some("debug init=/evil".into())),
        "cmdline.params[0] \"RUST_LOG=debug init=/evil\": a value is printable ASCII without \
         spaces or quotes"
    );
    assert!(invalid(|c| c.cmdline.params[1].key = "a b".into()).contains("a key is"));
    assert!(invalid(|c| c.cmdline.params[1].key = String::new()).contains("a key is"));
    assert!(invalid(|c| c.cmdline.params[0].value = Some("\"x".into())).contains("quotes"));
    assert_eq!(
        invalid(|c| c.cmdline.base = Some("console=ttyS0\nx".into())),
        "cmdline.base must be printable ASCII (no control characters)"
    );
    let long = KernelParam::new("k", "v".repeat(MAX_CMDLINE_BYTES));
    assert!(invalid(|c| c.cmdline.params.push(long))
        .starts_with("the kernel command line is longer than 2048 bytes"));
}

#[test]
fn the_reader_stops_at_the_cap() {
    // A stream that never ends: the reader must stop after the cap, not read it all.
    let endless = std::io::repeat(b' ');
    let err = VmConfig::from_reader(endless).unwrap_err();
    assert_eq!(err.to_string(), "the VM config is larger than 131072 bytes");
    // Exactly at the cap is still read (and then judged as JSON).
    let mut json = br#"{"kernel": "/k"}"#.to_vec();
    json.resize(MAX_CONFIG_BYTES, b' ');
    assert_eq!(
        VmConfig::from_reader(&json[..]).unwrap(),
        VmConfig::new("/k")
    );
    json.push(b' ');
    assert!(matches!(
        VmConfig::from_json(&json),
        Err(ConfigError::TooLarge { .. })
    ));
}

#[test]
fn a_read_error_is_reported() {
    struct Broken;
    impl std::io::Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken pipe of a test"))
        }
    }
    let msg = VmConfig::from_reader(Broken).unwrap_err().to_string();
    assert!(msg.starts_with("cannot read the VM config: "), "{msg}");
}

#[test]
fn to_json_refuses_an_invalid_config() {
    let mut c = full();
    c.vcpus = 0;
    assert!(matches!(c.to_json(), Err(ConfigError::Vcpus(0))));
}

#[test]
fn disk_rate_limits_are_checked_and_named() {
    let limit = |c: &VmConfig| c.disks[1].rate_limit.unwrap();
    type Change = fn(&mut RateLimitConfig);
    let cases: [(Change, &str); 5] = [
        (
            |l| l.ops.as_mut().unwrap().refill_time_ms = 0,
            "disks[1].rate_limit.ops: refill_time_ms must not be 0 (leave the bucket out for no limit)",
        ),
        (
            |l| l.bandwidth.as_mut().unwrap().size = 0,
            "disks[1].rate_limit.bandwidth: size must not be 0 (leave the bucket out for no limit)",
        ),
        (
            |l| l.bandwidth.as_mut().unwrap().refill_time_ms = MAX_REFILL_TIME_MS + 1,
            "disks[1].rate_limit.bandwidth: refill_time_ms must be at most 3600000 (one hour)",
        ),
        (
            |l| l.bandwidth.as_mut().unwrap().one_time_burst = Some(0),
            "disks[1].rate_limit.bandwidth: one_time_burst must not be 0 (leave it out for none)",
        ),
        (
            |l| l.ops = Some(TokenBucketConfig::new(0, 0)),
            "disks[1].rate_limit.ops: size must not be 0 (leave the bucket out for no limit)",
        ),
    ];
    for (change, want) in cases {
        let msg = invalid(|c| {
            let mut l = limit(c);
            change(&mut l);
            c.disks[1].rate_limit = Some(l);
        });
        assert_eq!(msg, want);
    }
    // No bucket at all is allowed (and limits nothing).
    let mut c = full();
    c.disks[1].rate_limit = Some(RateLimitConfig::default());
    c.validate().unwrap();
    assert!(!RateLimitConfig::default().is_limited());
}

#[test]
fn disk_rate_limit_json_shape() {
    let json = r#"{"kernel":"/k","disks":[{"path":"/d","rate_limit":
        {"bandwidth":{"size":4096,"refill_time_ms":10},"ops":{"size":2,"one_time_burst":5,"refill_time_ms":1000}}}]}"#;
    let c = VmConfig::from_json(json.as_bytes()).unwrap();
    let limit = c.disks[0].rate_limit.unwrap();
    assert_eq!(limit.bandwidth, Some(TokenBucketConfig::new(4096, 10)));
    assert_eq!(limit.ops.unwrap().one_time_burst, Some(5));
    assert!(limit.is_limited());
    let unknown = r#"{"kernel":"/k","disks":[{"path":"/d","rate_limit":{"iops":{"size":1,"refill_time_ms":1}}}]}"#;
    assert!(VmConfig::from_json(unknown.as_bytes()).is_err());
    // An unlimited disk serialises as before.
    let plain = serde_json::to_string(&DiskConfig {
        path: "/d".into(),
        read_only: false,
        rate_limit: None,
    })
    .unwrap();
    assert!(!plain.contains("rate_limit"), "{plain}");
}
