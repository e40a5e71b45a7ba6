//! `maos db migrate|status`: the PostgreSQL task-data schema that `database.primary_url` names.

use super::args::DbCommand;
use super::{load_config, Refused};

/// `maos db migrate|status`: the PostgreSQL task-data schema.
pub async fn run(command: DbCommand) -> anyhow::Result<()> {
    let (DbCommand::Migrate(args) | DbCommand::Status(args)) = &command;
    let (mut config, _) = load_config(args.config.as_ref())?;
    if let Some(url) = &args.database_url {
        config.database.primary_url = Some(url.clone());
    }
    config.validate()?;
    if config.database.primary_url.is_none() {
        anyhow::bail!(
            "database.primary_url is not set: task data is embedded in the replicated state and has no schema; set MAOS_DATABASE_PRIMARY_URL or --database-url"
        );
    }
    let metrics = Default::default();
    let store = maos_node::storage::postgres::PgStore::connect_lazy(
        config.database.primary_url.as_deref().unwrap_or_default(),
        &config.database,
        metrics,
    )?;
    if let DbCommand::Migrate(_) = command {
        store.migrate().await?;
    }
    let status = store.migration_status().await?;
    let pending = status.iter().filter(|m| m.installed_on.is_none()).count();
    if args.json {
        println!("{}", serde_json::json!({ "database": store.name, "migrations": status, "pending": pending }));
    } else {
        println!("database {}", store.name);
        println!("{:<10} {:<28} APPLIED", "VERSION", "DESCRIPTION");
        for m in &status {
            println!("{:<10} {:<28} {}", m.version, m.description, m.installed_on.as_deref().unwrap_or("pending"));
        }
        if pending == 0 {
            println!("the schema is current");
        } else {
            println!("{pending} pending: run `maos db migrate`");
        }
    }
    if pending > 0 {
        return Err(Refused(format!("{pending} migration(s) pending")).into());
    }
    Ok(())
}
