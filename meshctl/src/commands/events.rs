//! `meshctl events publish|replay|tail`.

use crate::{
    args::{EventsCommand, Output},
    error::CliError,
    output::dash,
};

use futures::StreamExt;
use mesh_proto::dial::AdminChannel;
use mesh_proto::v1;
use serde_json::json;
use std::time::Duration;

pub async fn run(cmd: EventsCommand, ch: AdminChannel, out: Output, addr: &str) -> Result<(), CliError> {
    let st = |s: tonic::Status| CliError::from_status(s, addr);
    let mut bus = v1::events_client::EventsClient::new(ch);
    let print = |d: &v1::Delivery| match out {
        Output::Json => out!("{}", mesh_proto::delivery_json(d)),
        Output::Table => {
            let e = d.event.clone().unwrap_or_default();
            out!(
                "{:>6}  {}  {}  {}  {}",
                d.offset,
                e.id,
                dash(&e.key),
                e.r#type,
                String::from_utf8_lossy(&e.data)
            );
        }
    };
    match cmd {
        EventsCommand::Publish { topic, data, key, kind, id } => {
            let event = v1::Event {
                id: id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                topic,
                source: "meshctl".into(),
                r#type: kind,
                key,
                time_unix_ms: mesh_proto::unix_ms(std::time::SystemTime::now()),
                data: data.into_bytes(),
                content_type: "application/json".into(),
                ..Default::default()
            };
            let r = bus.publish(v1::PublishRequest { events: vec![event] }).await.map_err(st)?.into_inner();
            for x in r.results {
                match out {
                    Output::Json => {
                        out!("{}", json!({"id": x.id, "offset": x.offset, "duplicate": x.duplicate}))
                    }
                    Output::Table if x.duplicate => {
                        out!("{} was already at offset {} (duplicate dropped)", x.id, x.offset)
                    }
                    Output::Table => out!("{} stored at offset {}", x.id, x.offset),
                }
            }
        }
        EventsCommand::Replay { topic, from_offset, from_time, limit } => {
            let req = v1::ReplayRequest { topic, from_offset, from_time_unix_ms: from_time, limit };
            let mut s = bus.replay(req).await.map_err(st)?.into_inner();
            let (mut printed, mut last) = (0u32, None);
            while let Some(d) = s.next().await {
                let d = d.map_err(st)?;
                last = Some(d.offset);
                printed += 1;
                print(&d);
            }
            let asked = if limit == 0 { mesh_proto::DEFAULT_REPLAY_LIMIT } else { limit };
            if let Some(last) = last.filter(|_| printed == asked) {
                eprintln!(
                    "{printed} events printed (--limit); there may be more: continue with --from-offset {}",
                    last + 1
                );
            }
        }
        EventsCommand::Tail { topic, group, from_offset, from_time, from_end, count } => {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let start = v1::SubscribeStart {
                topic,
                group: group.clone(),
                from_offset,
                from_time_unix_ms: from_time,
                from_end,
            };
            let _ =
                tx.send(v1::SubscribeRequest { kind: Some(v1::subscribe_request::Kind::Start(start)) }).await;
            let mut s = bus
                .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(st)?
                .into_inner();
            let mut seen = 0u64;
            loop {
                let d = tokio::select! {
                    _ = mesh_runtime::shutdown_signal() => break,
                    d = s.next() => match d { Some(d) => d.map_err(st)?, None => break },
                };
                print(&d);
                if !group.is_empty() {
                    let commit = v1::SubscribeCommit { offset: d.offset + 1 };
                    let _ = tx
                        .send(v1::SubscribeRequest {
                            kind: Some(v1::subscribe_request::Kind::Commit(commit)),
                        })
                        .await;
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            // Close our side so the server applies the last commit and ends the stream.
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(3), async { while s.next().await.is_some() {} })
                .await;
        }
    }
    Ok(())
}
