//! `maos auth …`: API keys (create, list, revoke) and who the token authenticates as.

use maos_client::proto::v1::auth_service_client::AuthServiceClient;
use maos_client::proto::v1::{
    ApiKey, CreateKeyRequest, ListAuditRequest, ListKeysRequest, RevokeKeyRequest, WhoAmIRequest,
};

use super::args::{AuditCommand, AuthCommand, KeyCommand, Target};
use super::output::{print_table, table};

/// Parse a lifetime: `90d`, `12h`, `30m`, `45s`, or seconds.
pub fn parse_lifetime(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&text[..at], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d (e.g. 90d)")),
    };
    let value: u64 = number.parse().map_err(|_| format!("{text:?} is not a lifetime such as 90d, 12h or 3600"))?;
    if value == 0 {
        return Err("a lifetime must be at least 1 (leave --expires out for a key that never expires)".into());
    }
    value.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

async fn raw(
    target: &Target,
) -> anyhow::Result<
    AuthServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, maos_client::Authorization>,
    >,
> {
    let client = super::client(target)?;
    let channel = client.channel(0).ok_or_else(|| anyhow::anyhow!("no endpoint"))?;
    Ok(AuthServiceClient::with_interceptor(channel, client.authorization()))
}

fn typed(status: tonic::Status) -> anyhow::Error {
    maos_client::ClientError::from_status(status).into()
}

fn key_json(key: &ApiKey) -> serde_json::Value {
    serde_json::json!({"id": key.id, "name": key.name, "role": key.role, "created_by": key.created_by,
        "created_at_ms": key.created_at_ms, "expires_at_ms": (key.expires_at_ms > 0).then_some(key.expires_at_ms)})
}

/// `maos auth …`.
pub async fn run(command: AuthCommand) -> anyhow::Result<()> {
    match command {
        AuthCommand::Key(KeyCommand::Create { name, role, expires, target }) => {
            let expires_in_s = match expires {
                Some(text) => parse_lifetime(&text).map_err(|e| anyhow::anyhow!("--expires: {e}"))?,
                None => 0,
            };
            let answer = raw(&target)
                .await?
                .create_key(CreateKeyRequest { name, role, expires_in_s })
                .await
                .map_err(typed)?
                .into_inner();
            let key = answer.key.unwrap_or_default();
            if target.json {
                let mut json = key_json(&key);
                json["secret"] = answer.secret.into();
                println!("{json}");
            } else {
                println!("created API key {} ({}, role {})", key.id, key.name, key.role);
                println!("secret (shown once; store it in your secret manager):");
                println!("{}", answer.secret);
            }
            Ok(())
        }
        AuthCommand::Key(KeyCommand::List { target }) => {
            let keys = raw(&target).await?.list_keys(ListKeysRequest {}).await.map_err(typed)?.into_inner().keys;
            if target.json {
                println!("{}", serde_json::Value::Array(keys.iter().map(key_json).collect()));
                return Ok(());
            }
            let mut rows = table(&["ID", "NAME", "ROLE", "CREATED BY", "EXPIRES (ms since epoch)"], &[]);
            for key in &keys {
                let expires = if key.expires_at_ms > 0 { key.expires_at_ms.to_string() } else { "never".into() };
                rows.add_row(vec![key.id.clone(), key.name.clone(), key.role.clone(), key.created_by.clone(), expires]);
            }
            print_table(&rows);
            Ok(())
        }
        AuthCommand::Key(KeyCommand::Revoke { id, target }) => {
            raw(&target).await?.revoke_key(RevokeKeyRequest { id: id.clone() }).await.map_err(typed)?;
            println!("revoked API key {id}");
            Ok(())
        }
        AuthCommand::Whoami { target } => {
            let me = raw(&target).await?.who_am_i(WhoAmIRequest {}).await.map_err(typed)?.into_inner();
            if target.json {
                println!(
                    "{}",
                    serde_json::json!({"principal": me.principal, "roles": me.roles, "auth_enabled": me.auth_enabled})
                );
            } else {
                println!(
                    "{} (roles: {}; auth {})",
                    me.principal,
                    me.roles.join(", "),
                    if me.auth_enabled { "on" } else { "off" }
                );
            }
            Ok(())
        }
    }
}

/// `maos audit list`.
pub async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::List { since, principal, limit, target } = command;
    let since_ms = match since {
        Some(text) => {
            let ago = parse_lifetime(&text).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            now.saturating_sub(ago.saturating_mul(1_000))
        }
        None => 0,
    };
    let request = ListAuditRequest { since_ms, principal: principal.unwrap_or_default(), limit };
    let entries = raw(&target).await?.list_audit(request).await.map_err(typed)?.into_inner().entries;
    if target.json {
        let rows = entries.iter().map(|e| {
            let detail: serde_json::Value = serde_json::from_str(&e.detail_json).unwrap_or_default();
            serde_json::json!({"at_ms": e.at_ms, "node_id": e.node_id, "principal": e.principal,
                "action": e.action, "target": e.target, "detail": detail})
        });
        println!("{}", serde_json::Value::Array(rows.collect()));
        return Ok(());
    }
    let mut rows = table(&["AT (ms since epoch)", "NODE", "PRINCIPAL", "ACTION", "TARGET", "DETAIL"], &[1]);
    for e in &entries {
        rows.add_row(vec![
            e.at_ms.to_string(),
            e.node_id.to_string(),
            e.principal.clone(),
            e.action.clone(),
            super::output::short(&e.target, 48),
            super::output::short(&e.detail_json, 60),
        ]);
    }
    print_table(&rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_lifetime;

    #[test]
    fn lifetimes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_lifetime("90d"), Ok(90 * 86_400));
        assert_eq!(parse_lifetime("12h"), Ok(43_200));
        assert_eq!(parse_lifetime("3600"), Ok(3_600));
        assert!(parse_lifetime("0").is_err());
        assert!(parse_lifetime("5y").is_err());
        assert!(parse_lifetime("").is_err());
        assert!(parse_lifetime("99999999999999999999d").is_err());
    }
}
