//! The conformance suite (`engine/proto/tests/spec_rules.rs`, every rule of
//! docs/CONFORMANCE.md that the engine decides) run against the carrier `SessionTable`, the
//! store dynauthd serves from, instead of the reference `MemoryStore`.

/// The store the shared test support runs the engine over.
type StoreUnderTest = dynauth_table::SessionTable;

#[path = "../../proto/tests/spec_rules.rs"]
mod spec_rules;

impl spec_rules::common::TestStore for dynauth_table::SessionTable {
    fn from_sessions(sessions: Vec<dynauth_proto::session::Session>) -> Self {
        dynauth_table::SessionTable::with_sessions(sessions)
    }
    fn sessions(&self) -> Vec<dynauth_proto::session::Session> {
        self.snapshot()
    }
}
