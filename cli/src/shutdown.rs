//! When a long-running command stops: on Ctrl-C or SIGTERM, and, inside
//! one process, a switch that tells every service started together to stop
//! together (each `serve(listener, …, shutdown)` takes a future from it).

use std::future::Future;
use tokio::sync::watch;

/// Resolves on Ctrl-C (SIGINT) or SIGTERM (what `docker stop`, systemd and
/// Kubernetes send). If SIGTERM cannot be hooked, Ctrl-C still works.
pub async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// One stop switch for the services of a process.
pub struct Stop {
    tx: watch::Sender<bool>,
}

impl Default for Stop {
    fn default() -> Self {
        Stop::new()
    }
}

impl Stop {
    pub fn new() -> Stop {
        Stop {
            tx: watch::channel(false).0,
        }
    }

    /// A future that resolves once `stop()` is called (at once if it was).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // An error means the switch itself is gone: nobody can stop us
            // any more, so that counts as stopped too.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    pub fn stop(&self) {
        self.tx.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_waiter_resolves_on_stop_including_late_ones() {
        let stop = Stop::new();
        let early = tokio::spawn(stop.stopped());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!early.is_finished(), "resolved before stop()");
        stop.stop();
        tokio::time::timeout(Duration::from_secs(1), early)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), stop.stopped())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn dropping_the_switch_releases_its_waiters() {
        let stop = Stop::new();
        let waiter = stop.stopped();
        drop(stop);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap();
    }
}
