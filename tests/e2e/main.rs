//! End-to-end scenarios: real `fleetvault-coordinator` and `fleetvault-agent` processes, driven
//! through their command lines. One test binary, one module per scenario, tests named as
//! operator stories. The harness (guards, test data, tree comparison) is `tests/src/`.

mod bundles;
mod command_stream;
mod corruption;
mod crash;
mod download;
mod files;
mod full_disk;
mod gc;
mod hostile;
mod hostile_files;
mod hostile_integrity;
mod hostile_limits;
mod hostile_restore;
mod hostile_trust;
mod mariadb;
mod memory;
mod mongodb;
mod postgres;
mod push;
mod replication;
mod revocation;
mod schedule;
mod security;
mod shutdown;
mod sqlite;
mod unreachable;
