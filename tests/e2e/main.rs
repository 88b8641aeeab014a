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
mod operator_cli;
mod postgres;
mod postgres_tls;
mod push;
mod reload;
mod replication;
mod revocation;
mod schedule;
mod scheduled_verify;
mod security;
mod shutdown;
mod sqlite;
mod systemd_sandbox;
mod unreachable;
mod versions;
