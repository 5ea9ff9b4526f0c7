//! Bare rumqttd 0.20 with nothing attached: the same broker settings as Messina's embedded broker
//! (`messina_broker::mqtt::rumqttd_config`), no bridge, no storage. The broker's own limit in
//! `benches/compare`. Usage: `rumqttd-host PORT_V311 PORT_V5`; runs until killed.

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u16>());
    let (Some(Ok(v4)), Some(Ok(v5))) = (args.next(), args.next()) else {
        eprintln!("usage: rumqttd-host PORT_V311 PORT_V5");
        std::process::exit(2);
    };
    let mqtt = messina_config::MqttConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], v4)),
        listen_v5: std::net::SocketAddr::from(([127, 0, 0, 1], v5)),
        ..Default::default()
    };
    let config = match messina_broker::mqtt::rumqttd_config(&mqtt) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rumqttd-host: {e:#}");
            std::process::exit(1);
        }
    };
    let mut broker = rumqttd::Broker::new(config);
    if let Err(e) = broker.start() {
        eprintln!("rumqttd-host: {e}");
        std::process::exit(1);
    }
}
