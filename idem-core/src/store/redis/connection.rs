//! One connection type for both topologies: a single node's connection
//! manager or a cluster connection, each re-established by redis-rs when it
//! drops. Commands and scripts run on it the same way.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to a Redis node or cluster. Clones share the connection.
#[derive(Clone)]
pub(crate) enum Connection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A node whose keys one `SCAN` walks: the node itself, or one primary of a
/// cluster.
#[derive(Debug)]
pub(crate) enum ScanTarget {
    Node,
    Primary { host: String, port: u16 },
}

impl Connection {
    /// Where a `SCAN` of every key must go: the node, or each primary.
    pub(crate) async fn scan_targets(&mut self) -> redis::RedisResult<Vec<ScanTarget>> {
        let Self::Cluster(cluster) = self else {
            return Ok(vec![ScanTarget::Node]);
        };
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(cluster)
            .await?;
        let mut primaries: Vec<(String, u16)> = Vec::new();
        if let Value::Array(ranges) = slots {
            for range in ranges {
                // [start, end, [host, port, id, …] (the primary), replicas…]
                let Value::Array(range) = range else { continue };
                let Some(Value::Array(primary)) = range.get(2) else {
                    continue;
                };
                let host = match primary.first() {
                    Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
                    Some(Value::SimpleString(host)) => host.clone(),
                    _ => continue,
                };
                let Some(Value::Int(port)) = primary.get(1) else {
                    continue;
                };
                let Ok(port) = u16::try_from(*port) else {
                    continue;
                };
                if !primaries.contains(&(host.clone(), port)) {
                    primaries.push((host, port));
                }
            }
        }
        Ok(primaries
            .into_iter()
            .map(|(host, port)| ScanTarget::Primary { host, port })
            .collect())
    }

    /// One `SCAN` step on `target`: the next cursor and the keys.
    pub(crate) async fn scan(
        &mut self,
        target: &ScanTarget,
        cursor: u64,
        pattern: &str,
    ) -> redis::RedisResult<(u64, Vec<Vec<u8>>)> {
        let mut command = redis::cmd("SCAN");
        command
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        match (self, target) {
            (Self::Cluster(cluster), ScanTarget::Primary { host, port }) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let value = cluster.route_command(command, routing).await?;
                Ok(redis::from_redis_value(value)?)
            }
            (connection, _) => command.query_async(connection).await,
        }
    }
}
