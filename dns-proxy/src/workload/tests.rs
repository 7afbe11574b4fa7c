use super::*;

const ID: &str = "0bc5eac79e3ae7a0c2651f14722aa10fa333eb2325c2ca97da33aa284cda81b0";
const UID: &str = "0b7632a2-a56e-4278-987a-22de18008dbe";

fn parse(path: &str) -> Workload {
    Workload::from_cgroup_path(Path::new(path))
}

fn pod(container: Option<&str>) -> Workload {
    Workload::Pod {
        uid: UID.into(),
        container: container.map(Into::into),
        node: None,
    }
}

/// A pod of the kind node (Docker container) `node`.
fn pod_in(node: &str, container: Option<&str>) -> Workload {
    Workload::Pod {
        uid: UID.into(),
        container: container.map(Into::into),
        node: Some(node.into()),
    }
}

fn underscored() -> String {
    UID.replace('-', "_")
}

#[test]
fn names_pods_and_containers_of_the_systemd_driver_for_each_runtime_and_qos() {
    let u = underscored();
    for (qos_slice, qos) in [
        ("kubepods-burstable.slice/", "burstable-"),
        ("kubepods-besteffort.slice/", "besteffort-"),
        ("", ""),
    ] {
        let pod_slice = format!("/kubepods.slice/{qos_slice}kubepods-{qos}pod{u}.slice");
        assert_eq!(parse(&pod_slice), pod(None), "{pod_slice}");
        for runtime in ["cri-containerd-", "crio-", "docker-"] {
            let path = format!("{pod_slice}/{runtime}{ID}.scope");
            assert_eq!(parse(&path), pod(Some(ID)), "{path}");
        }
    }
}

#[test]
fn names_pods_and_containers_of_the_cgroupfs_driver() {
    for qos in ["burstable/", "besteffort/", ""] {
        let pod_dir = format!("/kubepods/{qos}pod{UID}");
        assert_eq!(parse(&pod_dir), pod(None), "{pod_dir}");
        assert_eq!(parse(&format!("{pod_dir}/{ID}")), pod(Some(ID)));
        assert_eq!(parse(&format!("{pod_dir}/crio-{ID}")), pod(Some(ID)));
    }
    // A real one, from a GKE node's /proc/self/cgroup.
    assert_eq!(
        parse(
            "/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/\
             34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376"
        ),
        Workload::Pod {
            uid: "74c13223-5a00-11e9-b385-42010a80018d".into(),
            container: Some(
                "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376".into()
            ),
            node: None,
        }
    );
}

#[test]
fn names_pods_nested_under_kind_nodes_and_other_prefixes() {
    let u = underscored();
    // kind: the node is a Docker container whose kubelet uses kubelet.slice.
    let kind = format!(
        "/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/\
         kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/\
         cri-containerd-{ID}.scope"
    );
    assert_eq!(parse(&kind), pod_in(ID, Some(ID)));
    let guaranteed = format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{u}.slice");
    assert_eq!(parse(&guaranteed), pod(None));
    let under_containerd = format!(
        "/system.slice/containerd.service/kubepods-burstable-pod{u}.slice:cri-containerd:{ID}"
    );
    assert_eq!(parse(&under_containerd), pod(Some(ID)));
    let nested = format!("/system.slice/containerd.service/kubepods/burstable/pod{UID}/{ID}");
    assert_eq!(parse(&nested), pod(Some(ID)));
    // k3s in a cgroup of its own.
    assert_eq!(
        parse(&format!("/k3s/kubepods/pod{UID}/{ID}")),
        pod(Some(ID))
    );
}

/// A workload that makes cgroups below its own (a service with `Delegate=yes`, any user's
/// own manager) cannot take another's name by shaping them like it: the outermost identity
/// wins, whatever its kind. Before, a pod anywhere came first, then a Docker container, and a
/// delegated service was named, and listed in the names table, as the container it mimicked
/// (helper-124).
#[test]
fn a_delegated_subtree_cannot_take_another_workloads_name() {
    let u = underscored();
    let evil = Workload::Unit {
        name: "evil.service".into(),
        user: None,
    };
    for below in [
        format!("docker/{ID}"),
        format!("docker-{ID}.scope"),
        format!("kubepods/burstable/pod{UID}/{ID}"),
        format!("kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
        format!("kubepods-pod{u}.slice:cri-containerd:{ID}"),
    ] {
        let path = format!("/system.slice/evil.service/{below}");
        assert_eq!(parse(&path), evil, "{path}");
    }
    // A user's manager: the user's own unit, never a pod or a container.
    let path = format!(
        "/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/\
         kubepods-pod{u}.slice/cri-containerd-{ID}.scope"
    );
    assert_eq!(
        parse(&path),
        Workload::Unit {
            name: format!("cri-containerd-{ID}.scope"),
            user: Some(1000),
        }
    );
    let path = format!("/user.slice/user-1000.slice/user@1000.service/docker/{ID}");
    assert_eq!(
        parse(&path),
        Workload::Unit {
            name: "user@1000.service".into(),
            user: Some(1000),
        }
    );
    // A runtime's own unit is looked through to its pods, and is itself otherwise.
    assert_eq!(
        parse("/system.slice/containerd.service"),
        Workload::Unit {
            name: "containerd.service".into(),
            user: None,
        }
    );
}

/// A Docker container's root may make cgroups in its own (kind, Sysbox, a private cgroupns
/// with the hierarchy mounted read-write): one that made a real pod's shape below itself was
/// named as that pod, and its answers were listed in the pod's names table (helper-171). Its
/// pods are named with it now, so never as a pod of the host's own.
#[test]
fn a_docker_containers_pods_are_named_with_it_and_never_as_the_hosts() {
    let u = underscored();
    let node = "d".repeat(64);
    let host_pod = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/\
         cri-containerd-{ID}.scope"
    );
    assert_eq!(parse(&host_pod), pod(Some(ID)));
    for forged in [
        format!("/system.slice/docker-{node}.scope/kubepods/besteffort/pod{UID}/{ID}"),
        format!("/docker/{node}/kubepods/besteffort/pod{UID}/{ID}"),
        format!("/docker/{node}{host_pod}"),
    ] {
        let workload = parse(&forged);
        assert_eq!(workload, pod_in(&node, Some(ID)), "{forged}");
        assert_ne!(workload.key(), parse(&host_pod).key(), "{forged}");
    }
    assert_eq!(
        pod_in(&node, Some(ID)).to_string(),
        format!("docker=dddddddddddd pod={UID} container=0bc5eac79e3a")
    );
    assert_eq!(
        pod_in(&node, None).key(),
        format!("docker={node} pod={UID}")
    );
    // Containers of layouts not known here, named by a 64-hex id or not: named by their
    // path, never looked through (helper-176: BuildKit's 25-character ids, `firecracker/vm-7`).
    for container in [
        "/docker/buildkit/k3ql9x0aqwe2rfbwp5v8dzm7n",
        "/buildkit/k3ql9x0aqwe2rfbwp5v8dzm7n",
        "/firecracker/vm-7",
    ] {
        let forged = format!("{container}/kubepods/besteffort/pod{UID}/{ID}");
        assert!(
            matches!(parse(&forged), Workload::Cgroup { .. }),
            "{forged}: {:?}",
            parse(&forged)
        );
        let forged = format!(
            "{container}/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        assert!(
            matches!(parse(&forged), Workload::Cgroup { .. }),
            "{forged}: {:?}",
            parse(&forged)
        );
    }
    // Containers of layouts not known here: named by their path, never looked through.
    for container in [format!("/custom/{node}"), format!("/default/{node}")] {
        let forged = format!("{container}/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(
            parse(&forged),
            Workload::Cgroup {
                path: container.clone()
            },
            "{forged}"
        );
    }
}

#[test]
fn a_containers_own_sub_cgroups_still_name_that_container() {
    let u = underscored();
    let other = "1".repeat(64);
    let fake = format!(
        "kubepods-pod{}.slice/cri-containerd-{other}.scope",
        "1".repeat(32)
    );
    let path = format!(
        "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope/init.scope/{fake}"
    );
    assert_eq!(parse(&path), pod(Some(ID)));
}

#[test]
fn takes_static_pods_config_hash_as_their_uid() {
    let hash = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    assert_eq!(
        parse(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice"
        )),
        Workload::Pod {
            uid: hash.into(),
            container: None,
            node: None,
        }
    );
}

#[test]
fn crio_conmon_is_the_pod_not_a_container() {
    let u = underscored();
    let path = format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope");
    assert_eq!(parse(&path), pod(None));
}

#[test]
fn names_docker_containers_of_both_drivers() {
    let docker = Workload::Docker { id: ID.into() };
    assert_eq!(parse(&format!("/docker/{ID}")), docker);
    assert_eq!(parse(&format!("/system.slice/docker-{ID}.scope")), docker);
    assert_eq!(parse(&format!("/docker/{ID}/sub")), docker);
    assert_eq!(docker.to_string(), "docker=0bc5eac79e3a");
    assert_eq!(docker.key(), format!("docker={ID}"));
}

/// Podman's and LXC's containers are named as such, and, as the outermost identity, keep an
/// unprivileged container's root from naming itself after a pod or a unit by making cgroups
/// in its own (helper-127: an unprivileged LXC container was logged, counted and listed as
/// `pod=... container=...` and as `unit=sshd.service`).
#[test]
fn names_podman_and_lxc_containers_and_nothing_below_them() {
    let u = underscored();
    let podman = Workload::Container {
        runtime: "podman",
        id: ID.into(),
    };
    let lxc = Workload::Container {
        runtime: "lxc",
        id: "web-1".into(),
    };
    assert_eq!(parse(&format!("/libpod_parent/libpod-{ID}")), podman);
    assert_eq!(parse(&format!("/machine.slice/libpod-{ID}.scope")), podman);
    assert_eq!(parse("/lxc.payload.web-1"), lxc);
    assert_eq!(parse("/lxc/web-1"), lxc, "LXC 3's layout");
    for below in [
        format!("kubepods/burstable/pod{UID}/{ID}"),
        format!("kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
        format!("docker/{ID}"),
        "system.slice/sshd.service".to_owned(),
        "init.scope".to_owned(),
    ] {
        assert_eq!(
            parse(&format!("/lxc.payload.web-1/{below}")),
            lxc,
            "{below}"
        );
        assert_eq!(parse(&format!("/lxc/web-1/{below}")), lxc, "{below}");
        let path = format!("/machine.slice/libpod-{ID}.scope/container/{below}");
        assert_eq!(parse(&path), podman, "{path}");
    }
    assert_eq!(podman.to_string(), "podman=0bc5eac79e3a");
    assert_eq!(podman.key(), format!("podman={ID}"));
    assert_eq!(lxc.to_string(), "lxc=web-1");
    // Podman's monitor is a unit; a name that does not validate is the path up to it.
    assert_eq!(
        parse(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
        Workload::Unit {
            name: format!("libpod-conmon-{ID}.scope"),
            user: None,
        }
    );
    assert_eq!(
        parse(&format!("/lxc.payload.a b/docker/{ID}")),
        Workload::Cgroup {
            path: "/lxc.payload.a b".into()
        }
    );
    // A name that is only dots, or none (helper-132: `lxc.payload..` was `lxc=.`).
    for odd in ["lxc.payload..", "lxc.payload."] {
        assert_eq!(
            parse(&format!("/{odd}/system.slice/sshd.service")),
            Workload::Cgroup {
                path: format!("/{odd}")
            }
        );
    }
    // Inside a user's manager (rootless Podman), the user's own unit still comes first.
    let path =
        format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
    assert_eq!(
        parse(&path),
        Workload::Unit {
            name: format!("libpod-{ID}.scope"),
            user: Some(1000),
        }
    );
}

#[test]
fn names_systemd_units_system_and_user() {
    let system = |name: &str| Workload::Unit {
        name: name.into(),
        user: None,
    };
    let user = |name: &str| Workload::Unit {
        name: name.into(),
        user: Some(1000),
    };
    assert_eq!(
        parse("/system.slice/nginx.service"),
        system("nginx.service")
    );
    assert_eq!(
        parse("/system.slice/foo.slice/bar.service"),
        system("bar.service")
    );
    assert_eq!(
        parse("/system.slice/dns-proxy.service/dns-proxy-agent"),
        system("dns-proxy.service")
    );
    assert_eq!(parse("/init.scope"), system("init.scope"));
    assert_eq!(
        parse("/system.slice/system-getty.slice/getty@tty1.service"),
        system("getty@tty1.service")
    );
    assert_eq!(
        parse("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service"),
        user("x.service")
    );
    assert_eq!(
        parse("/user.slice/user-1000.slice/user@1000.service/init.scope"),
        user("init.scope")
    );
    assert_eq!(
        parse("/user.slice/user-1000.slice/session-3.scope"),
        user("session-3.scope")
    );
    assert_eq!(
        parse("/user.slice/user-1000.slice/user@1000.service"),
        user("user@1000.service")
    );
    assert_eq!(user("x.service").to_string(), "unit=x.service user=1000");
    assert_eq!(system("nginx.service").to_string(), "unit=nginx.service");
}

#[test]
fn anything_else_is_its_path() {
    let path = |p: &str| Workload::Cgroup { path: p.into() };
    assert_eq!(parse("/"), path("/"));
    assert_eq!(parse(""), path("/"));
    assert_eq!(parse("/system.slice"), path("/system.slice"));
    assert_eq!(parse("my-cgroup/leaf/"), path("/my-cgroup/leaf"));
    assert_eq!(path("/a/b").to_string(), "cgroup=/a/b");
}

#[test]
fn names_that_do_not_validate_fall_through_to_the_path() {
    let u = underscored();
    let odd = [
        // Uid too short, too long, uppercase, dashes in a systemd name, non-hex.
        format!("/kubepods.slice/kubepods-pod{}.slice", &u[1..]),
        format!("/kubepods.slice/kubepods-pod{u}0.slice"),
        format!("/kubepods.slice/kubepods-pod{}.slice", u.to_uppercase()),
        format!("/kubepods.slice/kubepods-pod{UID}.slice"),
        "/kubepods.slice/kubepods-podzzzzzzzz_zzzz_zzzz_zzzz_zzzzzzzzzzzz.slice".into(),
        "/kubepods.slice/kubepods-pod.slice".into(),
        // A pod directory that is not where kubelet puts one.
        format!("/elsewhere/pod{UID}/{ID}"),
        // Docker ids of the wrong length or alphabet.
        format!("/docker/{}", &ID[1..]),
        format!("/docker/{}", ID.to_uppercase()),
        "/docker/".into(),
    ];
    for path in odd {
        let parsed = parse(&path);
        assert!(
            matches!(parsed, Workload::Cgroup { .. }),
            "{path}: {parsed:?}"
        );
    }
    // Still a valid systemd scope name, so the unit, not a container.
    assert_eq!(
        parse(&format!("/system.slice/docker-{ID}x.scope")),
        Workload::Unit {
            name: format!("docker-{ID}x.scope"),
            user: None
        }
    );
    // A pod whose container part does not validate is still the pod.
    let bad_container = format!(
        "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{}.scope",
        &ID[2..]
    );
    assert_eq!(parse(&bad_container), pod(None));
}

#[test]
fn hostile_names_neither_panic_nor_break_a_log_line() {
    let nasty = [
        "/a\nb/c d=e\\\"f\u{7f}\u{200b}",
        "/kubepods.slice/kubepods-pod\u{e9}\u{e9}.slice",
        "/kubepods-pod.slice/-.scope",
        "/user.slice/user-99999999999999999999.slice/user@-1.service/.service",
        "////",
        "/docker-.scope",
        "/kubepods/pod/",
        "/\u{0}",
    ];
    for path in nasty {
        let parsed = parse(path);
        for line in [parsed.to_string(), parsed.key()] {
            assert!(
                !line.chars().any(|c| c.is_control() || c == '\u{200b}'),
                "{path:?} → {line:?}"
            );
            let value = line.split_once('=').map_or("", |(_, value)| value);
            assert!(!value.contains([' ', '=']), "{path:?} → {line:?}");
        }
    }
    assert_eq!(parse("/a\nb c").to_string(), "cgroup=/a\\u{a}b\\u{20}c");
    // Not a .service: a unit name needs a stem and systemd's characters.
    assert!(matches!(
        parse("/system.slice/.service"),
        Workload::Cgroup { .. }
    ));
    assert!(matches!(
        parse("/system.slice/a b.service"),
        Workload::Cgroup { .. }
    ));
}

#[test]
fn compact_form_shortens_container_ids_and_full_form_keeps_them() {
    let workload = pod(Some(ID));
    assert_eq!(
        workload.to_string(),
        format!("pod={UID} container=0bc5eac79e3a")
    );
    assert_eq!(workload.key(), format!("pod={UID} container={ID}"));
    assert_eq!(workload.full().to_string(), workload.key());
    assert_eq!(pod(None).to_string(), format!("pod={UID}"));
}

/// A directory tree of the test's own, removed on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn new(parent: &Path, name: &str) -> Self {
        let dir = parent.join(name);
        fs::create_dir(&dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
        Self(dir)
    }

    fn mkdir(&self, relative: &str) -> u64 {
        let dir = self.0.join(relative);
        fs::create_dir(&dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
        fs::metadata(&dir).unwrap().ino()
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        // cgroupfs refuses recursive removal of files (cgroup.procs, ...): rmdir leaves
        // first, deepest first.
        let mut dirs = Vec::new();
        let mut stack = vec![self.0.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            if fs::remove_dir(dir).is_err() {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }
}

fn temp_tree() -> TempTree {
    TempTree::new(
        &std::env::temp_dir(),
        &format!(
            "dns-proxy-test-paths-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(['(', ')'], ""),
    )
}

#[test]
fn resolves_ids_from_one_walk_and_walks_no_more_often_than_the_interval() {
    let tree = temp_tree();
    let a = tree.mkdir("a");
    let b = tree.mkdir("a/b");
    let paths = CgroupPaths::with_limits(
        &tree.0,
        CgroupPathsLimits {
            min_walk_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    assert_eq!(paths.resolve(b).unwrap(), Some(PathBuf::from("/a/b")));
    assert_eq!(paths.resolve(a).unwrap(), Some(PathBuf::from("/a")));
    let root = fs::metadata(&tree.0).unwrap().ino();
    assert_eq!(paths.resolve(root).unwrap(), Some(PathBuf::from("/")));
    assert_eq!(paths.walks(), 1);
    // A storm of unknown ids, and a cgroup made since: no walk until the interval is up.
    let c = tree.mkdir("c");
    for id in 0..1000 {
        assert_eq!(paths.resolve(u64::MAX - id).unwrap(), None);
    }
    assert_eq!(paths.resolve(c).unwrap(), None);
    assert_eq!(paths.walks(), 1);
}

#[test]
fn keeps_the_asked_id_when_the_tree_is_larger_than_the_cache() {
    let tree = temp_tree();
    let ids: Vec<u64> = (0..20).map(|n| tree.mkdir(&format!("d{n}"))).collect();
    let paths = CgroupPaths::with_limits(
        &tree.0,
        CgroupPathsLimits {
            capacity: 4,
            min_walk_interval: Duration::ZERO,
            walk_time_factor: 0,
            ..Default::default()
        },
    );
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            paths.resolve(*id).unwrap(),
            Some(PathBuf::from(format!("/d{n}")))
        );
        assert!(paths.cached() <= 4);
    }
}

#[test]
fn bounds_the_depth_and_does_not_follow_symlinks() {
    let tree = temp_tree();
    let mut deep = String::from("x");
    let mut deepest = tree.mkdir(&deep);
    for _ in 0..5 {
        deep.push_str("/x");
        deepest = tree.mkdir(&deep);
    }
    std::os::unix::fs::symlink("/", tree.0.join("link")).unwrap();
    let paths = CgroupPaths::with_limits(
        &tree.0,
        CgroupPathsLimits {
            max_depth: 3,
            min_walk_interval: Duration::ZERO,
            ..Default::default()
        },
    );
    assert_eq!(paths.resolve(deepest).unwrap(), None);
    let slash = fs::metadata("/").unwrap().ino();
    let mut found = std::collections::HashMap::new();
    paths
        .walk(|id, path| {
            found.insert(id, Path::new("/").join(path));
        })
        .unwrap();
    assert_eq!(found.len(), 4, "{found:?}"); // the root and x, x/x, x/x/x
    assert!(
        found
            .get(&slash)
            .is_none_or(|path| !path.starts_with("/link"))
    );
}

#[test]
fn an_unreadable_root_is_an_error_naming_it() {
    let paths = CgroupPaths::new("/nonexistent/cgroup2");
    let err = paths.resolve(1).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/cgroup2"), "{err}");
}

/// Panics unless running as root: a privileged test must never skip quietly.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this test makes cgroups and needs root: run `cargo xtask test` as root (see \
             tests/README.md)"
        );
    }
}

#[test]
fn resolves_real_cgroups_and_drops_the_ones_removed() {
    require_root();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount =
        crate::cgroup::parse_cgroup2_mount(&mountinfo).expect("no cgroup2 mount on this machine");
    let name = format!("dns-proxy-test-wl-{}", std::process::id());
    let tree = TempTree::new(&mount, &name);
    let parent = fs::metadata(&tree.0).unwrap().ino();
    let child = tree.mkdir("child");
    let paths = CgroupPaths::with_limits(
        &mount,
        CgroupPathsLimits {
            min_walk_interval: Duration::from_millis(50),
            walk_time_factor: 0,
            ..Default::default()
        },
    );
    assert_eq!(
        paths.resolve(child).unwrap(),
        Some(PathBuf::from(format!("/{name}/child")))
    );
    assert_eq!(
        paths.workload(parent).unwrap(),
        Some(Workload::Cgroup {
            path: format!("/{name}")
        })
    );
    // The root cgroup's id on cgroup v2 is its inode, 1.
    assert_eq!(paths.resolve(1).unwrap(), Some(PathBuf::from("/")));

    fs::remove_dir(tree.0.join("child")).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    // A miss walks again (the interval is up), and the walk forgets the child.
    assert_eq!(paths.resolve(u64::MAX).unwrap(), None);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(paths.resolve(child).unwrap(), None);
    assert_eq!(
        paths.resolve(parent).unwrap(),
        Some(PathBuf::from(format!("/{name}")))
    );
    assert_eq!(paths.walks(), 3);
}

#[test]
fn the_time_between_walks_grows_with_the_time_a_walk_takes() {
    let tree = temp_tree();
    for n in 0..200 {
        tree.mkdir(&format!("d{n}"));
    }
    let paths = CgroupPaths::with_limits(
        &tree.0,
        CgroupPathsLimits {
            min_walk_interval: Duration::ZERO,
            walk_time_factor: 1_000_000,
            ..Default::default()
        },
    );
    // Unknown ids: the first walks, the rest wait a million walks' time.
    for id in 0..100 {
        assert_eq!(paths.resolve(u64::MAX - id).unwrap(), None);
    }
    assert_eq!(paths.walks(), 1);
}

#[test]
fn a_long_path_is_kept_cut_at_a_component_and_a_long_name_with_its_cgroup_id() {
    let (long_a, long_b) = ("a".repeat(300), "b".repeat(300));
    let path = PathBuf::from(format!("/top/{long_a}/{long_b}"));
    assert_eq!(cut_path(&path), PathBuf::from(format!("/top/{long_a}")));
    let lone = PathBuf::from(format!("/{}", "c".repeat(600)));
    assert_eq!(cut_path(&lone), lone, "at least the first component");
    let short = PathBuf::from("/kubepods.slice/x.scope");
    assert_eq!(cut_path(&short), short);

    let name = parse(&format!("/{}", "=".repeat(200))).key();
    assert!(name.len() > NAME_BYTES);
    let bounded = bounded_name(name.clone(), 42);
    assert!(bounded.len() <= NAME_BYTES + 32, "{bounded}");
    let kept = bounded.trim_end_matches("... cgroup-id=42");
    assert!(
        name.starts_with(kept) && kept.len() > NAME_BYTES - 8,
        "{bounded}"
    );
    assert!(kept.ends_with('}'), "no escape cut in two: {bounded}");
    assert!(bounded.ends_with("... cgroup-id=42"), "{bounded}");
    assert_eq!(&*bounded_name("pod=x".to_owned(), 42), "pod=x");
}
