//! The harness itself: clusters clean up after themselves (also when a test panics and after a
//! run that was killed), a component that fails to start is reported with its log, and a
//! stopped API server comes back with its data.

use std::{path::PathBuf, time::Duration};

use e2e::{Cluster, ClusterOptions, Component, Error};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

fn runs(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would still show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn pids(cluster: &Cluster) -> Vec<u32> {
    [
        Component::Etcd,
        Component::ApiServer,
        Component::ControllerManager,
    ]
    .into_iter()
    .map(|c| cluster.pid(c).expect("every component runs"))
    .collect()
}

#[tokio::test]
async fn dropping_a_cluster_stops_exactly_its_processes_and_removes_its_files() {
    let cluster = Cluster::start("solo").await.unwrap();
    let pids = pids(&cluster);
    let dir = cluster.dir().to_owned();
    assert!(pids.iter().all(|&p| runs(p)));
    assert!(dir.join("kubeconfig").is_file());
    // The Node that test Pods are placed on exists.
    let nodes: Api<Node> = Api::all(cluster.client());
    nodes.get(&cluster.node_name()).await.unwrap();

    drop(cluster);
    for pid in pids {
        assert!(!runs(pid), "process {pid} still runs");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel::<(Vec<u32>, PathBuf)>();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let cluster = Cluster::start("panics").await.unwrap();
            tx.send((pids(&cluster), cluster.dir().to_owned())).unwrap();
            panic!("a test failed while its cluster ran");
        })
    }));
    assert!(result.is_err());
    let (pids, dir) = rx.recv().unwrap();
    for pid in pids {
        assert!(!runs(pid), "process {pid} outlived the panic");
    }
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_component_that_fails_to_start_is_reported_with_its_log() {
    let root = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::new("broken");
    opts.root = root.path().to_owned();
    opts.extra_apiserver_args = vec!["--no-such-flag=1".to_owned()];
    let err = Cluster::start_with(opts).await.unwrap_err();
    match &err {
        Error::Exited {
            cluster,
            component,
            tail,
            ..
        } => {
            assert_eq!(cluster, "broken");
            assert_eq!(*component, "kube-apiserver");
            assert!(tail.contains("unknown flag: --no-such-flag"), "{tail}");
        }
        other => panic!("unexpected error: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("kube-apiserver exited during start-up"),
        "{msg}"
    );
    // Nothing is left behind: etcd, which had started, was stopped with the rest.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn start_sweeps_what_a_killed_run_left_behind() {
    let root = tempfile::tempdir().unwrap();
    // A cluster directory whose owner died without cleaning up, with a process still running.
    let stale = root.path().join("east-424242-1");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("owner"), "424242 1").unwrap();
    std::fs::write(stale.join("marker"), "").unwrap();
    let mut orphan = std::process::Command::new("tail")
        .args(["-f", "/dev/null"])
        .arg(stale.join("marker"))
        .spawn()
        .unwrap();
    std::fs::write(stale.join("etcd.pid"), orphan.id().to_string()).unwrap();
    // Right after spawn the kernel may not show the new command line yet (the exec is still
    // setting it up), and the sweep would rightly leave a process that does not name the
    // directory; a real leftover is long past that point.
    let needle = stale.join("marker").display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read(format!("/proc/{}/cmdline", orphan.id()))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan never showed its command line"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut opts = ClusterOptions::new("fresh");
    opts.root = root.path().to_owned();
    let cluster = Cluster::start_with(opts).await.unwrap();
    assert!(!stale.exists());
    // Bounded, so that a regression fails here instead of hanging the run.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = orphan.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let cmdline =
                std::fs::read(format!("/proc/{}/cmdline", orphan.id())).unwrap_or_default();
            let _ = orphan.kill();
            panic!(
                "the orphan {} outlived the sweep; its command line: {:?}",
                orphan.id(),
                String::from_utf8_lossy(&cmdline)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "the orphan was killed");
    assert!(cluster.dir().starts_with(root.path()));
}

#[tokio::test]
async fn a_restarted_api_server_serves_the_same_data_to_the_same_client() {
    let mut cluster = Cluster::start("restart").await.unwrap();
    let client = cluster.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("kept".into()),
            ..Default::default()
        },
        data: Some([("k".to_owned(), "v".to_owned())].into()),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let old_pid = cluster.pid(Component::ApiServer).unwrap();

    cluster.kill(Component::ApiServer);
    assert!(cms.get("kept").await.is_err(), "answered while stopped");
    assert!(!runs(old_pid));

    cluster.start_component(Component::ApiServer).await.unwrap();
    assert_ne!(cluster.pid(Component::ApiServer), Some(old_pid));
    let got = tokio::time::timeout(Duration::from_secs(10), cms.get("kept"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.data.unwrap()["k"], "v");
}
