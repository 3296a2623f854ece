//! The supervisor's guarantees, end to end.

use crate::util::*;

#[test]
fn the_shop_cluster_serves() {
    let cluster = Cluster::start(
        "serves",
        &format!(
            "exec = {}\nworkers = 2\nlisten = 127.0.0.1:0\n",
            example("shop").display()
        ),
    );
    cluster.wait_ready(1);
    let resp = get(cluster.addr(), "/products/1").unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.header("x-worker").is_some());
}
