//! Device uploads as a device and an operator see them, against the real binary and its embedded
//! S3 endpoint: presigned URLs asked for over HTTP, MQTT 5 (Response Topic, Correlation Data) and
//! MQTT 3.1.1; real PUTs of small PNG, JPEG, WAV and text files; completion with the extracted
//! metadata; the bytes back through the presigned download URL; every way an upload is refused,
//! each with the status and message a user can act on; URLs across a restart; an external endpoint
//! from config; and the uploads table on Cassandra.

use std::time::Duration;

use messina_mosquitto_tests::{now_ms, wait_for, Server};
use serde_json::{json, Value};

/// A PNG signature and IHDR chunk: enough for a reader of dimensions (CRCs are not checked).
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend_from_slice(&13u32.to_be_bytes());
    b.extend_from_slice(b"IHDR");
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&[8, 2, 0, 0, 0]);
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(b"IEND");
    b.extend_from_slice(&[0xAE, 0x42, 0x60, 0x82]);
    b
}

/// A JPEG with a JFIF APP0 segment and a baseline SOF0 frame header.
fn jpeg(width: u16, height: u16) -> Vec<u8> {
    let mut b = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
    b.extend_from_slice(b"JFIF\0");
    b.extend_from_slice(&[1, 1, 0, 0, 1, 0, 1, 0, 0]);
    b.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 8]);
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
    b.extend_from_slice(&[0xFF, 0xD9]);
    b
}

/// A 16-bit PCM mono WAV of `samples` silent samples at `rate` Hz.
fn wav(rate: u32, samples: u32) -> Vec<u8> {
    let data = samples * 2;
    let mut b = b"RIFF".to_vec();
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    b.resize(b.len() + data as usize, 0);
    b
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = http()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Asks for an upload over HTTP and expects a ticket.
async fn ask(server: &Server, device: &str, body: Value) -> Value {
    let (status, ticket) = post(server, &format!("/v1/devices/{device}/uploads"), body).await;
    assert_eq!(status, 201, "{ticket}");
    assert_eq!(ticket["method"], "PUT");
    ticket
}

/// PUTs `body` to `url` with the ticket's headers; returns the status and the S3 error text.
async fn put(url: &str, headers: &Value, body: Vec<u8>) -> (u16, String) {
    let mut request = http().put(url).body(body);
    for (k, v) in headers.as_object().unwrap() {
        // The body sets its own length; a device's HTTP client does the same.
        if k != "content-length" {
            request = request.header(k, v.as_str().unwrap());
        }
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn complete(server: &Server, device: &str, upload: &str) -> (u16, Value) {
    post(
        server,
        &format!("/v1/devices/{device}/uploads/{upload}/complete"),
        Value::Null,
    )
    .await
}

/// Requests, PUTs and completes one upload over HTTP; returns the completed upload.
async fn upload(server: &Server, device: &str, kind: &str, ctype: &str, bytes: &[u8]) -> Value {
    let ticket = ask(
        server,
        device,
        json!({"kind": kind, "content_type": ctype, "size": bytes.len(), "button_id": 1}),
    )
    .await;
    let (status, text) = put(
        ticket["url"].as_str().unwrap(),
        &ticket["headers"],
        bytes.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "PUT refused: {text}");
    let (status, done) = complete(server, device, ticket["upload_id"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "completed", "{done}");
    done
}

async fn download(url: &str) -> Vec<u8> {
    let r = http().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_http_record_metadata_and_download_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;

    let photo = png(640, 480);
    let done = upload(&server, "cam-1", "photo", "image/png", &photo).await;
    assert_eq!(done["extracted"]["width"], 640);
    assert_eq!(done["extracted"]["height"], 480);
    assert_eq!(done["extracted"]["format"], "png");
    assert_eq!(done["metadata"]["button_id"], 1);
    let key = done["object_key"].as_str().unwrap();
    assert!(key.starts_with("devices/cam-1/photo/"), "{key}");

    let done = upload(&server, "cam-1", "photo", "image/jpeg", &jpeg(320, 200)).await;
    assert_eq!(
        (
            done["extracted"]["width"].clone(),
            done["extracted"]["height"].clone()
        ),
        (json!(320), json!(200))
    );

    // 1.5 s at 8 kHz.
    let clip = wav(8000, 12_000);
    let done = upload(&server, "cam-1", "audio", "audio/wav", &clip).await;
    assert_eq!(done["extracted"]["duration_s"], 1.5);
    assert_eq!(done["extracted"]["sample_rate"], 8000);
    let clip_id = done["upload_id"].as_str().unwrap().to_string();

    let log = b"boot ok\nsync 3 files\nsync failed: timeout\n".to_vec();
    let done = upload(&server, "cam-1", "log", "text/plain", &log).await;
    assert_eq!(done["extracted"]["lines"], 3);

    // Completing again answers the same upload: a device may repeat `done` safely.
    let (status, again) = complete(&server, "cam-1", &clip_id).await;
    assert_eq!((status, again["state"].clone()), (200, json!("completed")));

    // The bytes come back through the presigned download URL of the upload.
    let (status, one) = server.get(&format!("/v1/uploads/{clip_id}")).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["extracted"]["duration_s"], 1.5);
    assert_eq!(
        download(one["download_url"].as_str().unwrap()).await,
        clip,
        "the downloaded clip is the uploaded one"
    );
    let (_, photo_one) = server
        .get(&format!(
            "/v1/uploads/{}",
            server.json("/v1/devices/cam-1/uploads?limit=10").await["items"][3]["upload_id"]
                .as_str()
                .unwrap()
        ))
        .await;
    assert_eq!(
        download(photo_one["download_url"].as_str().unwrap()).await,
        photo
    );

    // Listing: newest first, paged like the other listings, only the device's own.
    let items = messina_mosquitto_tests::all_pages(&server, "/v1/devices/cam-1/uploads", 3).await;
    let kinds: Vec<&str> = items.iter().map(|u| u["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["log", "audio", "photo", "photo"]);
    assert!(server.json("/v1/devices/other/uploads").await["items"]
        .as_array()
        .unwrap()
        .is_empty());

    // A SHA-256 declared up front is checked on completion.
    let ticket = ask(
        &server,
        "cam-1",
        json!({"kind": "log", "content_type": "text/plain", "size": 4,
               "sha256": "0000000000000000000000000000000000000000000000000000000000000000"}),
    )
    .await;
    let (status, _) = put(
        ticket["url"].as_str().unwrap(),
        &ticket["headers"],
        b"abcd".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = complete(&server, "cam-1", ticket["upload_id"].as_str().unwrap()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("SHA-256"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        "[uploads]\nphoto_max_bytes = 1000\n",
    )
    .await;
    let photo = png(16, 16);
    let ticket = ask(
        &server,
        "cam-1",
        json!({"kind": "photo", "content_type": "image/png", "size": photo.len()}),
    )
    .await;
    let url = ticket["url"].as_str().unwrap().to_string();
    let headers = ticket["headers"].clone();
    let id = ticket["upload_id"].as_str().unwrap().to_string();

    // Each tampering is refused by the S3 endpoint's signature check, so nothing is stored.
    let tampered = {
        let at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
        let flipped = if &url[at..at + 1] == "0" { "1" } else { "0" };
        format!("{}{}{}", &url[..at], flipped, &url[at + 1..])
    };
    let other_device = url.replace("/devices/cam-1/", "/devices/cam-2/");
    let mut png_as_jpeg = headers.clone();
    png_as_jpeg["content-type"] = json!("image/jpeg");
    let mut larger = photo.clone();
    larger.extend_from_slice(&[0; 100]);
    for (what, url, headers, body) in [
        ("tampered signature", &tampered, &headers, photo.clone()),
        (
            "another device's key",
            &other_device,
            &headers,
            photo.clone(),
        ),
        ("a body larger than declared", &url, &headers, larger),
        (
            "a different content type",
            &url,
            &png_as_jpeg,
            photo.clone(),
        ),
    ] {
        let (status, text) = put(url, headers, body).await;
        assert_eq!(status, 403, "{what}: {text}");
        assert!(text.contains("SignatureDoesNotMatch"), "{what}: {text}");
    }

    // Completion before any PUT names the missing step.
    let (status, body) = complete(&server, "cam-1", &id).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("PUT the file to the upload URL first"),
        "{body}"
    );
    // Another device cannot complete (or see) this device's upload.
    let (status, body) = complete(&server, "cam-2", &id).await;
    assert_eq!(status, 404, "{body}");

    // The real PUT works after all that, and completes.
    let (status, text) = put(&url, &headers, photo.clone()).await;
    assert_eq!(status, 200, "{text}");
    let (status, body) = complete(&server, "cam-1", &id).await;
    assert_eq!(
        (status, body["extracted"]["width"].clone()),
        (200, json!(16))
    );

    // Requests over a limit or of an unknown kind are 400 problems naming the field.
    for (body, parameter, says) in [
        (
            json!({"kind": "video", "content_type": "video/mp4", "size": 10}),
            "kind",
            "audio, photo, log",
        ),
        (
            json!({"kind": "photo", "content_type": "image/png", "size": 1001}),
            "size",
            "1000",
        ),
        (
            json!({"kind": "photo", "content_type": "image/gif", "size": 10}),
            "content_type",
            "image/jpeg",
        ),
        (
            json!({"kind": "photo", "content_type": "image/png", "size": 10, "sha256": "xyz"}),
            "sha256",
            "64 hexadecimal",
        ),
        (
            json!({"kind": "photo", "content_type": "image/png", "size": 10, "tags": [1]}),
            "metadata",
            "tags",
        ),
        (
            json!({"content_type": "image/png", "size": 10}),
            "body",
            "kind",
        ),
    ] {
        let (status, problem) = post(&server, "/v1/devices/cam-1/uploads", body.clone()).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert_eq!(problem["parameter"], parameter, "{body}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{body}: {problem}"
        );
    }

    // An object whose bytes are not what its type declares is rejected, and stays rejected.
    let lie = b"this is no png at all".to_vec();
    let ticket = ask(
        &server,
        "cam-1",
        json!({"kind": "photo", "content_type": "image/png", "size": lie.len()}),
    )
    .await;
    let (status, _) = put(ticket["url"].as_str().unwrap(), &ticket["headers"], lie).await;
    assert_eq!(status, 200);
    let lie_id = ticket["upload_id"].as_str().unwrap();
    let (status, body) = complete(&server, "cam-1", lie_id).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("declared image/png"),
        "{body}"
    );
    let stored = server.json(&format!("/v1/uploads/{lie_id}")).await;
    assert_eq!(stored["state"], "rejected");
    assert!(stored["download_url"].is_null());

    let (status, _) = server.get("/v1/uploads/cam-1~1~nope").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_urls_are_refused_and_uploads_marked_expired() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        "[uploads]\nurl_expiry_s = 1\nsweep_interval_s = 1\n",
    )
    .await;
    let log = b"late\n".to_vec();
    let ticket = ask(
        &server,
        "dev-1",
        json!({"kind": "log", "content_type": "text/plain", "size": log.len()}),
    )
    .await;
    let id = ticket["upload_id"].as_str().unwrap().to_string();
    // SigV4 dates have whole seconds: past the expiry plus that second, the URL must be dead.
    let created = server.json(&format!("/v1/uploads/{id}")).await;
    assert_eq!(created["state"], "pending");
    let deadline = now_ms() + 2_100;
    wait_for("the upload URL to expire", || async { now_ms() > deadline }).await;
    let (status, text) = put(ticket["url"].as_str().unwrap(), &ticket["headers"], log).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("AccessDenied"), "{text}");

    wait_for("the sweep to mark the upload expired", || async {
        server.json(&format!("/v1/uploads/{id}")).await["state"] == "expired"
    })
    .await;
    let (status, body) = complete(&server, "dev-1", &id).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("expired; ask for a new upload"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_handed_out_before_a_restart_works_after_it() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port, so the URL's address survives the restart; its key pair is kept on disk.
    let s3 = messina_mosquitto_tests::free_port();
    let mut server = Server::start(
        &dir.path().join("data"),
        &format!("[uploads]\ns3_listen = \"127.0.0.1:{s3}\"\n"),
    )
    .await;
    let photo = png(2, 3);
    let ticket = ask(
        &server,
        "cam-9",
        json!({"kind": "photo", "content_type": "image/png", "size": photo.len()}),
    )
    .await;
    assert!(server.terminate().await.success());
    server.restart().await;
    let (status, text) = put(ticket["url"].as_str().unwrap(), &ticket["headers"], photo).await;
    assert_eq!(status, 200, "{text}");
    let (status, done) = complete(&server, "cam-9", ticket["upload_id"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["extracted"]["height"], 3);
}

/// Reads publishes until one arrives on `topic`, failing after 15 s.
async fn next_v4(eventloop: &mut rumqttc::EventLoop, topic: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                eventloop.poll().await.expect("MQTT connection")
            {
                if p.topic == topic {
                    return serde_json::from_slice(&p.payload).unwrap();
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no reply on {topic} within 15 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_request_and_done_get_replies() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("mic-1", "127.0.0.1", server.mqtt), 10);
    let response = "devices/mic-1/uploads/response";
    client.subscribe(response, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            eventloop.poll().await.unwrap(),
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))
        ) {}
    })
    .await
    .expect("SUBACK");

    // A MessagePack request, as a small device would send it.
    let clip = wav(16_000, 8_000);
    let request = rmp_serde::to_vec_named(&json!({
        "kind": "audio", "content_type": "audio/wav", "size": clip.len(),
        "duration_s": 0.5, "button_id": 3
    }))
    .unwrap();
    client
        .publish(
            "devices/mic-1/uploads/request",
            QoS::AtLeastOnce,
            false,
            request,
        )
        .await
        .unwrap();
    let ticket = next_v4(&mut eventloop, response).await;
    assert_eq!(ticket["status"], 201, "{ticket}");
    let (status, text) = put(ticket["url"].as_str().unwrap(), &ticket["headers"], clip).await;
    assert_eq!(status, 200, "{text}");

    // A request the server refuses gets a reply that says why, on the same topic.
    client
        .publish(
            "devices/mic-1/uploads/request",
            QoS::AtLeastOnce,
            false,
            json!({"kind": "audio", "content_type": "audio/flac", "size": 10}).to_string(),
        )
        .await
        .unwrap();
    let refused = next_v4(&mut eventloop, response).await;
    assert_eq!(
        (refused["status"].clone(), refused["parameter"].clone()),
        (json!(400), json!("content_type")),
        "{refused}"
    );

    let id = ticket["upload_id"].as_str().unwrap();
    client
        .publish(
            "devices/mic-1/uploads/done",
            QoS::AtLeastOnce,
            false,
            json!({"upload_id": id}).to_string(),
        )
        .await
        .unwrap();
    let done = next_v4(&mut eventloop, response).await;
    assert_eq!(done["status"], 200, "{done}");
    assert_eq!(done["state"], "completed");
    assert_eq!(done["extracted"]["duration_s"], 0.5);
    assert_eq!(done["metadata"]["button_id"], 3);
    // Stored too: an operator sees the same upload over HTTP.
    let stored = server.json(&format!("/v1/uploads/{id}")).await;
    assert_eq!(stored["extracted"]["sample_rate"], 16_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_replies_honour_response_topic_and_correlation_data() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("cam-5", "127.0.0.1", server.mqtt_v5), 10);
    let inbox = "devices/cam-5/replies/uploads";
    client.subscribe(inbox, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            eventloop.poll().await.unwrap(),
            Event::Incoming(Packet::SubAck(_))
        ) {}
    })
    .await
    .expect("SUBACK");

    let ask = |topic: &'static str, body: Value, correlation: &'static [u8]| {
        let client = client.clone();
        async move {
            let properties = PublishProperties {
                response_topic: Some(inbox.to_string()),
                correlation_data: Some(bytes::Bytes::from_static(correlation)),
                ..Default::default()
            };
            client
                .publish_with_properties(
                    topic,
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                    properties,
                )
                .await
                .unwrap();
        }
    };

    let photo = jpeg(1024, 768);
    ask(
        "devices/cam-5/uploads/request",
        json!({"kind": "photo", "content_type": "image/jpeg", "size": photo.len()}),
        b"req-1",
    )
    .await;
    let (topic, correlation, ticket) = reply_v5(&mut eventloop).await;
    assert_eq!(topic, inbox);
    assert_eq!(correlation.as_deref(), Some(&b"req-1"[..]));
    assert_eq!(ticket["status"], 201, "{ticket}");
    let (status, text) = put(ticket["url"].as_str().unwrap(), &ticket["headers"], photo).await;
    assert_eq!(status, 200, "{text}");

    ask(
        "devices/cam-5/uploads/done",
        json!({"upload_id": ticket["upload_id"]}),
        b"req-2",
    )
    .await;
    let (topic, correlation, done) = reply_v5(&mut eventloop).await;
    assert_eq!(topic, inbox);
    assert_eq!(correlation.as_deref(), Some(&b"req-2"[..]));
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(
        (
            done["extracted"]["width"].clone(),
            done["extracted"]["height"].clone()
        ),
        (json!(1024), json!(768))
    );

    // A Response Topic outside the device's own `devices/{id}/` is not honoured: the reply goes
    // to the default topic, so a device cannot make Messina publish elsewhere.
    client
        .subscribe("devices/cam-5/uploads/response", QoS::AtLeastOnce)
        .await
        .unwrap();
    let properties = PublishProperties {
        response_topic: Some("alerts/cam-5/spoofed".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"req-3")),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "devices/cam-5/uploads/request",
            QoS::AtLeastOnce,
            false,
            json!({"kind": "log", "content_type": "text/plain", "size": 10}).to_string(),
            properties,
        )
        .await
        .unwrap();
    let (topic, correlation, ticket) = loop {
        // The SUBACK may come first; replies are what matter.
        let r = reply_v5(&mut eventloop).await;
        if r.1.as_deref() == Some(&b"req-3"[..]) {
            break r;
        }
    };
    assert_eq!(topic, "devices/cam-5/uploads/response");
    assert_eq!(correlation.as_deref(), Some(&b"req-3"[..]));
    assert_eq!(ticket["status"], 201, "{ticket}");
}

/// The next publish a v5 client receives: its topic, correlation data and JSON body.
async fn reply_v5(eventloop: &mut rumqttc::v5::EventLoop) -> (String, Option<Vec<u8>>, Value) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                let correlation = p
                    .properties
                    .and_then(|p| p.correlation_data)
                    .map(|c| c.to_vec());
                return (
                    String::from_utf8(p.topic.to_vec()).unwrap(),
                    correlation,
                    serde_json::from_slice::<Value>(&p.payload).unwrap(),
                );
            }
        }
    })
    .await
    .expect("a reply within 15 s")
}

/// `id, state, meta` of a row of the `uploads` table.
type UploadRow = (
    String,
    String,
    Option<std::collections::BTreeMap<String, String>>,
);

/// The same round trip on the ScyllaDB backend (a real Cassandra node), and the upload as an
/// analyst reads it with plain CQL. `scripts/cassandra start` starts the node; only
/// `MESSINA_SKIP_SCYLLA_TESTS=1` skips this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(messina_skip_scylla, ignore = "MESSINA_SKIP_SCYLLA_TESTS=1")]
async fn uploads_on_cassandra_are_stored_and_readable_with_cql() {
    use messina_storage::scylla::test_node;
    let analyst = test_node::analyst().await;
    let ks = test_node::fresh_keyspace("uploads").await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &messina_mosquitto_tests::scylla_backend_toml(&ks, &test_node::nodes()),
    )
    .await;
    let done = upload(&server, "cam-s", "photo", "image/png", &png(33, 44)).await;
    let id = done["upload_id"].as_str().unwrap();
    let listed = server.json("/v1/devices/cam-s/uploads").await;
    assert_eq!(listed["items"][0]["upload_id"], id);

    let rows: Vec<UploadRow> = analyst
        .query_unpaged(
            format!("SELECT id, state, meta FROM {ks}.uploads WHERE device_id = 'cam-s'"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 1);
    let (row_id, state, meta) = &rows[0];
    assert_eq!((row_id.as_str(), state.as_str()), (id, "completed"));
    let meta = meta.clone().unwrap_or_default();
    assert_eq!(
        (meta["width"].as_str(), meta["height"].as_str()),
        ("33", "44")
    );
    drop(server);
    analyst
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await
        .unwrap();
}

/// An external S3-compatible endpoint from config (`uploads.endpoint`, an access key and a
/// `secret_access_key_file`): here another Messina's embedded endpoint stands in for MinIO or AWS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_endpoint_from_config_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = messina_mosquitto_tests::free_port();
    let store = Server::start(
        &dir.path().join("store"),
        &format!("[uploads]\ns3_listen = \"127.0.0.1:{s3}\"\n"),
    )
    .await;
    let creds: Value = serde_json::from_slice(
        &std::fs::read(store.data.join("objects/credentials.json")).unwrap(),
    )
    .unwrap();
    let secret_file = dir.path().join("s3-secret");
    std::fs::write(
        &secret_file,
        format!("{}\n", creds["secret_access_key"].as_str().unwrap()),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &format!(
            "[uploads]\nendpoint = \"http://127.0.0.1:{s3}\"\naccess_key_id = \"{}\"\n\
             secret_access_key_file = \"{}\"\n",
            creds["access_key_id"].as_str().unwrap(),
            secret_file.display()
        ),
    )
    .await;
    let clip = wav(8000, 4000);
    let done = upload(&server, "mic-x", "audio", "audio/x-wav", &clip).await;
    assert_eq!(done["extracted"]["duration_s"], 0.5);
    let one = server
        .json(&format!(
            "/v1/uploads/{}",
            done["upload_id"].as_str().unwrap()
        ))
        .await;
    let url = one["download_url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!(
            "http://127.0.0.1:{s3}/messina-uploads/devices/mic-x/audio/"
        )),
        "{url}"
    );
    assert_eq!(download(url).await, clip);
    // No embedded endpoint was started for the second server.
    assert!(!server.data.join("objects").exists());
}
