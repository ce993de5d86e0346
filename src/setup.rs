//! The one step from a [`Config`] to the parts the service runs on: the listeners' addresses,
//! the compiled routes, the authenticator (its key read once), the trusted proxies, the Kafka
//! settings, the replay buffer's bounds and the log filter.
//!
//! Every command goes through [`Setup::build`] (`check-config`, `token`, `serve`, `demo`), so
//! they refuse the same configurations with the same message, and a running service holds
//! only parts that were built: nothing at run time can find its configuration invalid.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Authenticator;
use crate::pattern::Pattern;
use tracing_subscriber::EnvFilter;

use crate::config::{parse_addr, Config, ConfigError, LogConfig, RouteConfig};
use crate::kafka::KafkaSettings;
use crate::proxy::TrustedProxies;
use crate::resume;
use crate::route::Route;

/// A validated configuration and what was built from it. Made only by [`Setup::build`].
pub struct Setup {
    pub(crate) config: Arc<Config>,
    pub(crate) listen: SocketAddr,
    pub(crate) admin_listen: SocketAddr,
    /// By topic.
    pub(crate) routes: Arc<HashMap<String, Route>>,
    pub(crate) auth: Authenticator,
    pub(crate) proxies: TrustedProxies,
    pub(crate) kafka: KafkaSettings,
    pub(crate) replay: resume::Limits,
    /// `presence.rooms`, compiled.
    pub(crate) presence_rooms: Vec<Pattern>,
    log_filter: EnvFilter,
}

impl Setup {
    /// Checks `config` and builds its parts; an error names the setting at fault.
    pub fn build(config: Config) -> Result<Setup, ConfigError> {
        config.validate()?;
        let listen = parse_addr("server.listen", &config.server.listen)?;
        let admin_listen = parse_addr("server.admin_listen", &config.server.admin_listen)?;
        let proxies = TrustedProxies::parse(&config.server.trusted_proxies)
            .map_err(|e| ConfigError::invalid("server.trusted_proxies", e))?;
        let kafka = KafkaSettings::new(&config.kafka, &config.server.name)
            .map_err(|e| ConfigError::invalid("kafka", e.to_string()))?;
        let auth = Authenticator::from_config(&config.auth)?;
        let routes = Arc::new(compile_routes(&config)?);
        let replay = replay_limits(&config);
        let log_filter = log_filter(&config.log)?;
        let presence_rooms = config
            .presence
            .rooms
            .iter()
            .map(|r| Pattern::room(r))
            .collect::<Result<_, _>>()
            .map_err(|e| ConfigError::invalid("presence.rooms", e.to_string()))?;
        Ok(Setup {
            config: Arc::new(config),
            listen,
            admin_listen,
            routes,
            auth,
            proxies,
            kafka,
            replay,
            presence_rooms,
            log_filter,
        })
    }

    /// The configuration the parts were built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The log filter, for the one subscriber the process installs; the filter is not
    /// `Clone`, so a second call gets an empty one.
    pub fn take_log_filter(&mut self) -> EnvFilter {
        std::mem::take(&mut self.log_filter)
    }
}

/// The filter `log.level` names (for `demo`, whose logging starts before its setup).
pub fn log_filter(log: &LogConfig) -> Result<EnvFilter, ConfigError> {
    EnvFilter::try_new(&log.level).map_err(|e| {
        ConfigError::invalid("log.level", format!("invalid filter {:?}: {e}", log.level))
    })
}

fn compile_routes(config: &Config) -> Result<HashMap<String, Route>, ConfigError> {
    let compile = |(i, r): (usize, &RouteConfig)| {
        Route::from_config(r)
            .map(|route| (r.topic.clone(), route))
            .map_err(|e| ConfigError::invalid(format!("route[{i}] ({})", r.topic), e))
    };
    config.routes.iter().enumerate().map(compile).collect()
}

fn replay_limits(config: &Config) -> resume::Limits {
    let r = &config.resume;
    resume::Limits {
        bytes: r.buffer_bytes,
        // Memory never serves what a read back from Kafka would refuse as too old.
        max_age: Duration::from_secs(r.buffer_max_age_seconds.min(r.max_age_seconds)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_routes;

    fn hs_config() -> Config {
        let mut c = Config::default();
        c.auth.secret = Some("s3cret-s3cret-s3cret".into());
        c.routes = default_routes();
        c
    }

    fn refusal(c: Config) -> String {
        match Setup::build(c) {
            Ok(_) => panic!("built"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parts_that_cannot_be_built_name_their_key() {
        let mut c = hs_config();
        c.auth.secret = None;
        assert!(refusal(c).starts_with("auth.secret:"));

        let mut c = hs_config();
        c.routes[1].rooms.clear();
        let err = refusal(c);
        assert!(err.starts_with("route[1] (task-updates):"), "{err}");

        let mut c = hs_config();
        c.server.trusted_proxies = vec!["10.0.0.0/33".into()];
        let err = refusal(c);
        assert!(err.starts_with("server.trusted_proxies:"), "{err}");

        let mut c = hs_config();
        c.presence.rooms = vec!["ta*sk".into()];
        let err = refusal(c);
        assert!(err.starts_with("presence.rooms:"), "{err}");

        let mut c = hs_config();
        c.log.level = "roomcast=loud".into();
        let err = refusal(c);
        assert!(
            err.starts_with("log.level: invalid filter \"roomcast=loud\": "),
            "{err}"
        );
    }

    #[test]
    fn service_links_are_not_kafka_properties_and_unknown_properties_are_refused() {
        let mut c = hs_config();
        let vars = [
            ("ROOMCAST_KAFKA_PORT", "tcp://10.0.0.1:9092"),
            ("ROOMCAST_KAFKA_PORT_9092_TCP_ADDR", "10.0.0.1"),
            ("ROOMCAST_KAFKA_SERVICE_HOST", "10.0.0.1"),
            ("ROOMCAST_KAFKA_SECURITY_PROTOCOL", "plaintext"),
        ];
        c.apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap();
        assert_eq!(c.kafka.properties.len(), 1);
        assert!(Setup::build(c.clone()).is_ok());
        c.kafka
            .properties
            .insert("no.such.thing".into(), "1".into());
        let err = refusal(c);
        assert!(
            err.starts_with("kafka:") && err.contains("no.such.thing"),
            "{err}"
        );
    }

    #[test]
    fn a_range_refused_by_the_config_is_refused_before_anything_is_built() {
        let mut c = hs_config();
        c.websocket.read_buffer_bytes = 63;
        // An unreadable key too: the data's own check speaks first.
        c.auth.secret = None;
        assert_eq!(
            refusal(c),
            "websocket.read_buffer_bytes: must be between 64 and 4294967295"
        );
    }

    #[test]
    fn the_built_parts_are_those_of_the_config() {
        let mut c = hs_config();
        c.server.listen = "127.0.0.1:0".into();
        c.resume.buffer_max_age_seconds = 300;
        c.resume.max_age_seconds = 60;
        let setup = Setup::build(c).unwrap();
        assert_eq!(setup.listen, "127.0.0.1:0".parse().unwrap());
        let mut topics: Vec<&str> = setup.routes.keys().map(String::as_str).collect();
        topics.sort_unstable();
        assert_eq!(topics, ["entity-updates", "task-updates"]);
        assert_eq!(setup.replay.max_age, Duration::from_secs(60));
        assert_eq!(
            setup.kafka.group,
            format!("roomcast.{}", setup.config.server.name)
        );
        assert_eq!(
            setup.kafka.consumer.get("group.id"),
            Some(&*setup.kafka.group)
        );
        let replay_group = format!("{}.replay", setup.kafka.group);
        assert_eq!(setup.kafka.replay.get("group.id"), Some(&*replay_group));
    }
}
