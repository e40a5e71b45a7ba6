//! `maos agent …`: list, spawn, pause, resume and terminate agents.

use maos_client::{AgentChange, Client};

use super::args::AgentCommand;
use super::client;
use super::output::print_agents;

/// `maos agent …`.
pub async fn run(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::List { node, target } => {
            let list = client(&target)?.agents(node.unwrap_or(0)).await?;
            print_agents(&list.agents, target.json);
            if !target.json {
                println!("{} agents, {} busy", list.total, list.active);
            }
            Ok(())
        }
        AgentCommand::Spawn { agent_type, node, target } => {
            let view = client(&target)?.spawn_agent(node.unwrap_or(0), &agent_type).await?;
            print_agents(&[view], target.json);
            Ok(())
        }
        AgentCommand::Pause { agent_id, target } => {
            change_agent(&client(&target)?, &agent_id, AgentChange::Pause, target.json).await
        }
        AgentCommand::Resume { agent_id, target } => {
            change_agent(&client(&target)?, &agent_id, AgentChange::Resume, target.json).await
        }
        AgentCommand::Terminate { agent_id, target } => {
            change_agent(&client(&target)?, &agent_id, AgentChange::Terminate, target.json).await
        }
    }
}

/// Change an agent and print it.
pub async fn change_agent(client: &Client, agent_id: &str, change: AgentChange, json: bool) -> anyhow::Result<()> {
    let view = client.set_agent(agent_id, change).await?;
    print_agents(&[view], json);
    Ok(())
}
