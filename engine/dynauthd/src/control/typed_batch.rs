//! The control socket's two bulk messages read straight into typed values, without a
//! `serde_json::Value` tree: `batch` (a batch of 1,000 upserts is the feed's bulk form, and
//! building the tree, one map and one `String` per field of every session, was the control
//! thread's largest cost: docs/BENCHMARKS.md, "Where the control thread's time goes") and
//! `action_result` (one per action an agent commits).
//!
//! Owns: [`parse`] and [`parse_action_result`], which accept exactly the well-formed
//! messages of their kind and say nothing about the rest. Must not touch: what a wrong message is answered with. Anything
//! this reader does not take as it is (a field of the wrong type, a duplicate field, an
//! event given as an array, `"mode": null`, a session that does not parse, ...) makes it
//! return `None`, and the caller reads the line again through the `Value` path, which names
//! the field and the line at fault. So the two paths cannot disagree on an error: only one
//! of them ever reports errors, and this one only ever accepts what that one accepts (the
//! unit tests below pin each case where a typed reader is more lenient than the `Value`
//! path; `tests/control.rs` checks the error replies end to end).
#![forbid(unsafe_code)]

use std::borrow::Cow;

use dynauth_proto::action::SessionResult;
use dynauth_proto::dict::ErrorCause;
use dynauth_proto::feed::FeedEvent;
use dynauth_proto::session::Session;
use dynauth_proto::store::UpsertMode;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// A batch read by [`parse`]: the message's `id` and its events in order, each with the
/// NAS it names (not yet checked against the connection's claims) and its sequence number.
#[derive(Debug)]
pub(super) struct TypedBatch<'a> {
    pub id: Value,
    pub events: Vec<TypedEvent<'a>>,
}

#[derive(Debug)]
pub(super) struct TypedEvent<'a> {
    pub nas: Cow<'a, str>,
    pub seq: Option<u64>,
    pub event: FeedEvent,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    v: u64,
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    nas: Cow<'a, str>,
    /// `null` and absent are both "no sequence number", as on the `Value` path.
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    session: Option<&'a RawValue>,
    /// Absent is `create`; `null` is an error on the `Value` path, so only a present
    /// string is taken here (`deserialize_with` runs only for a present field).
    #[serde(default, borrow, deserialize_with = "present")]
    mode: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    acct_session_id: Option<Cow<'a, str>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    <Cow<'de, str>>::deserialize(d).map(Some)
}

/// The JSON object `raw` read as a `T`; `None` when it is no object (a typed struct would
/// also take an array) or does not read as one.
fn object<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    let text = raw.get();
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// The line read as the envelope `T` of a message whose op is `quoted_op` (with its
/// quotes); `None` at once for a line that does not even contain it (not worth a typed
/// parse that would fail), or when it does not read.
fn message<'a, T: Deserialize<'a>>(text: &'a str, quoted_op: &str) -> Option<T> {
    if !text.trim_start().starts_with('{') || !text.contains(quoted_op) {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// Reads `text` as a version-1 `batch` message, or `None` when it is anything else or
/// anything about it is wrong (then the `Value` path reads it and names the error).
pub(super) fn parse(text: &str) -> Option<TypedBatch<'_>> {
    let envelope: Envelope<'_> = message(text, r#""batch""#)?;
    if envelope.v != super::VERSION || envelope.op != "batch" {
        return None;
    }
    let mut events = Vec::with_capacity(envelope.events.len());
    for raw in envelope.events {
        events.push(typed_event(object(raw)?)?);
    }
    Some(TypedBatch {
        id: envelope.id.unwrap_or(Value::Null),
        events,
    })
}

/// An agent's `action_result` read by [`parse_action_result`].
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TypedActionResult {
    pub action: u64,
    pub results: Vec<(usize, SessionResult)>,
}

#[derive(Deserialize)]
struct ResultEnvelope<'a> {
    v: u64,
    #[serde(borrow)]
    op: Cow<'a, str>,
    action: u64,
    #[serde(borrow)]
    results: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResultFields<'a> {
    index: u64,
    #[serde(borrow)]
    result: Cow<'a, str>,
    /// `null` and absent are both "none", as on the `Value` path.
    #[serde(default)]
    error_cause: Option<u64>,
}

/// Reads `text` as a version-1 `action_result` message (`{"v": 1, "op": "action_result",
/// "action": N, "results": [{"index": 0, "result": "committed"}, ...]}`), or `None` when it
/// is anything else or anything about it is wrong (the `Value` path then names the field).
pub(super) fn parse_action_result(text: &str) -> Option<TypedActionResult> {
    let envelope: ResultEnvelope<'_> = message(text, r#""action_result""#)?;
    if envelope.v != super::VERSION || envelope.op != "action_result" {
        return None;
    }
    let mut results = Vec::with_capacity(envelope.results.len());
    for raw in envelope.results {
        let f: ResultFields<'_> = object(raw)?;
        let result = match (&*f.result, f.error_cause) {
            ("committed", _) => SessionResult::Committed,
            ("not_found", _) => SessionResult::NotFound,
            ("failed", None) => SessionResult::Failed(None),
            ("failed", Some(n)) => SessionResult::Failed(Some(
                u32::try_from(n)
                    .ok()
                    .and_then(ErrorCause::from_value)
                    .filter(|c| c.value() >= 400)?,
            )),
            _ => return None,
        };
        results.push((usize::try_from(f.index).ok()?, result));
    }
    Some(TypedActionResult {
        action: envelope.action,
        results,
    })
}

fn typed_event(f: Fields<'_>) -> Option<TypedEvent<'_>> {
    if f.nas.is_empty() {
        return None;
    }
    let event = match &*f.op {
        "upsert" => {
            let session: Session = object(f.session?)?;
            let mode = match f.mode.as_deref() {
                None | Some("create") => UpsertMode::Create,
                Some("refresh") => UpsertMode::Refresh,
                Some(_) => return None,
            };
            FeedEvent::Upsert { session, mode }
        }
        "delete" => match f.acct_session_id {
            Some(id) if !id.is_empty() => FeedEvent::Delete {
                acct_session_id: id.into_owned(),
            },
            _ => return None,
        },
        "nas_reset" => FeedEvent::NasReset,
        "sync_begin" => FeedEvent::SyncBegin,
        "sync_end" => FeedEvent::SyncEnd,
        _ => return None,
    };
    Some(TypedEvent {
        nas: f.nas,
        seq: f.seq,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Option<Vec<(String, Option<u64>, FeedEvent)>> {
        parse(text).map(|b| {
            b.events
                .into_iter()
                .map(|e| (e.nas.into_owned(), e.seq, e.event))
                .collect()
        })
    }

    #[test]
    fn a_well_formed_batch_is_read_into_the_events_the_value_path_builds() {
        let text = r#"{"v":1,"id":"b7","op":"batch","events":[
            {"op":"upsert","nas":"bng-1","seq":4,"session":{"acct_session_id":"s-1","user_name":"alice","framed_ip":"10.0.0.1"}},
            {"op":"upsert","nas":"bng-1","mode":"refresh","session":{"acct_session_id":"s-2"}},
            {"op":"delete","nas":"bng-1","seq":null,"acct_session_id":"s-3"},
            {"op":"nas_reset","nas":"bng-2","unknown_extra":true},
            {"op":"sync_begin","nas":"bng-3"},{"op":"sync_end","nas":"bng-3"}]}"#;
        let batch = parse(text).expect("a well-formed batch takes the typed path");
        assert_eq!(batch.id, Value::from("b7"));
        let got: Vec<_> = batch
            .events
            .into_iter()
            .map(|e| (e.nas.into_owned(), e.seq, e.event))
            .collect();
        let session = |id: &str, user: Option<&str>, ip: Option<&str>| Session {
            acct_session_id: Some(id.into()),
            user_name: user.map(Into::into),
            framed_ip: ip.map(|i| i.parse().unwrap()),
            ..Session::default()
        };
        assert_eq!(
            got,
            vec![
                (
                    "bng-1".into(),
                    Some(4),
                    FeedEvent::Upsert {
                        session: session("s-1", Some("alice"), Some("10.0.0.1")),
                        mode: UpsertMode::Create
                    }
                ),
                (
                    "bng-1".into(),
                    None,
                    FeedEvent::Upsert {
                        session: session("s-2", None, None),
                        mode: UpsertMode::Refresh
                    }
                ),
                (
                    "bng-1".into(),
                    None,
                    FeedEvent::Delete {
                        acct_session_id: "s-3".into()
                    }
                ),
                ("bng-2".into(), None, FeedEvent::NasReset),
                ("bng-3".into(), None, FeedEvent::SyncBegin),
                ("bng-3".into(), None, FeedEvent::SyncEnd),
            ]
        );
    }

    #[test]
    fn escaped_strings_are_read_as_their_text() {
        let got = events(
            r#"{"v":1,"op":"batch","events":[{"op":"upsert","nas":"n\u002d1","session":{"acct_session_id":"a\"b"}}]}"#,
        )
        .unwrap();
        assert_eq!(got[0].0, "n-1");
        let FeedEvent::Upsert { session, .. } = &got[0].2 else {
            panic!("{got:?}")
        };
        assert_eq!(session.acct_session_id.as_deref(), Some("a\"b"));
    }

    /// An `action_result` is read into what the `Value` path reads (`actions::parse_results`),
    /// and every shape it would refuse or read otherwise is left to it.
    #[test]
    fn an_action_result_is_read_as_the_value_path_reads_it_and_the_rest_is_left_to_it() {
        let text = r#"{"v":1,"op":"action_result","action":42,"results":[
            {"index":0,"result":"committed"},{"index":1,"result":"not_found","extra":1},
            {"index":2,"result":"failed"},{"index":3,"result":"failed","error_cause":null},
            {"index":4,"result":"failed","error_cause":504}]}"#;
        let got = parse_action_result(text).expect("the typed path takes it");
        let value: Value = serde_json::from_str(text).unwrap();
        let expected = crate::actions::parse_results(value.get("results")).unwrap();
        assert_eq!(got.action, 42);
        assert_eq!(got.results, expected);
        assert_eq!(
            got.results[4].1,
            SessionResult::Failed(ErrorCause::from_value(504))
        );
        let result =
            |r: &str| format!(r#"{{"v":1,"op":"action_result","action":1,"results":[{r}]}}"#);
        for text in [
            r#"{"v":2,"op":"action_result","action":1,"results":[]}"#.to_owned(),
            r#"{"v":1,"op":"action_result","action":1.0,"results":[]}"#.to_owned(),
            r#"{"v":1,"op":"action_result","action":-1,"results":[]}"#.to_owned(),
            r#"{"v":1,"op":"action_result","results":[]}"#.to_owned(),
            r#"{"v":1,"op":"action_result","action":1}"#.to_owned(),
            r#"{"v":1,"op":"action_result","action":1,"results":{}}"#.to_owned(),
            r#"{"v":1,"op":"hello","action_result":1,"action":1,"results":[]}"#.to_owned(),
            result(r#"[0,"committed"]"#),
            result(r#"{"result":"committed"}"#),
            result(r#"{"index":"0","result":"committed"}"#),
            result(r#"{"index":0}"#),
            result(r#"{"index":0,"result":"done"}"#),
            result(r#"{"index":0,"result":"failed","error_cause":"504"}"#),
            result(r#"{"index":0,"result":"failed","error_cause":201}"#),
            result(r#"{"index":0,"result":"failed","error_cause":999}"#),
            result(r#"{"index":0,"index":1,"result":"committed"}"#),
        ] {
            assert!(parse_action_result(&text).is_none(), "taken: {text}");
        }
        assert!(parse(text).is_none(), "an action_result is no batch");
    }

    /// Every shape the `Value` path refuses (or that is not a batch) is left to it: a typed
    /// struct would take some of these (an array for a struct, `null` for an absent
    /// `mode`, the last of two duplicate fields), so each is pinned here.
    #[test]
    fn anything_the_value_path_would_refuse_or_read_differently_is_left_to_it() {
        let ok_event = r#"{"op":"upsert","nas":"n","session":{"acct_session_id":"a"}}"#;
        let batch = |events: &str| format!(r#"{{"v":1,"op":"batch","events":[{events}]}}"#);
        assert!(events(&batch(ok_event)).is_some(), "the control case");
        let left_to_the_value_path = [
            // Not a version-1 batch.
            r#"{"v":2,"op":"batch","events":[]}"#.to_owned(),
            r#"{"v":1,"op":"upsert","nas":"n","session":{"acct_session_id":"a"}}"#.to_owned(),
            r#"{"v":1.0,"op":"batch","events":[]}"#.to_owned(),
            r#"{"op":"batch","events":[]}"#.to_owned(),
            r#"[1,"batch",[]]"#.to_owned(),
            r#"{"v":1,"op":"batch"}"#.to_owned(),
            r#"{"v":1,"op":"batch","events":{}}"#.to_owned(),
            r#"{"v":1,"v":1,"op":"batch","events":[]}"#.to_owned(),
            // An event given as an array (serde would fill the struct from it).
            batch(r#"["upsert","n",null,{"acct_session_id":"a"}]"#),
            batch("7"),
            // Fields of an event.
            batch(r#"{"op":"upsert","session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":"","session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":7,"session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"","nas":"n"}"#),
            batch(r#"{"op":"frobnicate","nas":"n"}"#),
            batch(r#"{"op":"upsert","nas":"n","nas":"m","session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":"n","seq":"x","session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":"n","seq":-1,"session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":"n","seq":1.5,"session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":"n"}"#),
            batch(r#"{"op":"upsert","nas":"n","session":null}"#),
            batch(r#"{"op":"upsert","nas":"n","session":["a"]}"#),
            batch(r#"{"op":"upsert","nas":"n","session":{"acct_session_id":"a","framed_ip":"x"}}"#),
            batch(r#"{"op":"upsert","nas":"n","session":{"colour":"red"}}"#),
            batch(r#"{"op":"upsert","nas":"n","mode":null,"session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"upsert","nas":"n","mode":"later","session":{"acct_session_id":"a"}}"#),
            batch(r#"{"op":"delete","nas":"n"}"#),
            batch(r#"{"op":"delete","nas":"n","acct_session_id":""}"#),
            batch(r#"{"op":"delete","nas":"n","acct_session_id":5}"#),
            // One bad event among good ones: the whole line goes to the `Value` path.
            batch(&format!(
                r#"{ok_event},{{"op":"upsert","nas":"n","seq":"x"}}"#
            )),
        ];
        for text in &left_to_the_value_path {
            assert!(events(text).is_none(), "taken by the typed path: {text}");
        }
    }
}
