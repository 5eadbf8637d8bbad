//! deploy, diff and destroy, through CloudFormation change sets.

use crate::config::StackConfig;
use crate::describe;
use anyhow::bail;
use aws_sdk_cloudformation::types::{
    Capability, Change, ChangeAction, ChangeSetStatus, ChangeSetType, Parameter, Replacement,
    StackEvent, Tag,
};
use aws_sdk_cloudformation::Client;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

/// How often to ask CloudFormation while waiting, and how long without news before a
/// progress line.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub poll: Duration,
    pub progress_every: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(2),
            progress_every: Duration::from_secs(15),
        }
    }
}

/// What a stack looks like now.
#[derive(Debug, Clone)]
pub struct Existing {
    pub status: String,
    pub parameters: BTreeMap<String, String>,
}

/// `None` when there is no such stack (or only a deleted one).
pub async fn existing(cf: &Client, name: &str) -> anyhow::Result<Option<Existing>> {
    match cf.describe_stacks().stack_name(name).send().await {
        Ok(out) => Ok(out.stacks().first().map(|s| Existing {
            status: s
                .stack_status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            parameters: s
                .parameters()
                .iter()
                .filter_map(|p| {
                    Some((
                        p.parameter_key()?.to_string(),
                        p.parameter_value().unwrap_or_default().to_string(),
                    ))
                })
                .collect(),
        })),
        Err(e) if e.code() == Some("ValidationError") => Ok(None),
        Err(e) => Err(anyhow::anyhow!(
            "cannot describe stack {name}: {}",
            describe(&e)
        )),
    }
}

/// A change set made and described, not yet executed.
pub struct Planned {
    pub id: String,
    pub create: bool,
    pub changes: Vec<Change>,
    /// Parameters whose value differs from the deployed stack's: (name, old, new).
    pub parameter_changes: Vec<(String, String, String)>,
    /// CloudFormation found nothing to do.
    pub empty: bool,
}

/// Stacks in these states cannot take a change set: what to do instead.
fn blocked(status: &str, name: &str) -> Option<String> {
    if status == "ROLLBACK_COMPLETE" || status == "ROLLBACK_FAILED" {
        return Some(format!(
            "stack {name} is {status} after a failed first deploy and cannot be updated: run `agent-fleet destroy`, fix the cause, then deploy again"
        ));
    }
    if status == "DELETE_FAILED" {
        return Some(format!(
            "stack {name} is DELETE_FAILED: run `agent-fleet destroy` again (its output names what could not be deleted)"
        ));
    }
    if status.ends_with("_IN_PROGRESS") && status != "REVIEW_IN_PROGRESS" {
        return Some(format!(
            "stack {name} is busy ({status}): wait until it settles (`agent-fleet status`), then try again"
        ));
    }
    None
}

/// Creates a change set for `cfg` and waits until CloudFormation has worked it out.
pub async fn plan(
    cf: &Client,
    cfg: &StackConfig,
    pace: Pace,
    out: &mut impl Write,
) -> anyhow::Result<Planned> {
    let name = &cfg.stack_name;
    let body = crate::template::body();
    if body.len() > crate::TEMPLATE_BODY_LIMIT {
        bail!(
            "the template is {} bytes without its comments, above CloudFormation's {} for an inline template",
            body.len(),
            crate::TEMPLATE_BODY_LIMIT
        );
    }
    let current = existing(cf, name).await?;
    if let Some(why) = current.as_ref().and_then(|c| blocked(&c.status, name)) {
        bail!(why);
    }
    let create = current
        .as_ref()
        .is_none_or(|c| c.status == "REVIEW_IN_PROGRESS");
    let old = current.map(|c| c.parameters).unwrap_or_default();
    let parameter_changes = if create {
        vec![]
    } else {
        cfg.parameters
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| {
                (
                    k.clone(),
                    old.get(k).cloned().unwrap_or_default(),
                    v.clone(),
                )
            })
            .collect()
    };

    let change_set_name = format!(
        "agent-fleet-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let parameters: Vec<Parameter> = cfg
        .parameters
        .iter()
        .map(|(k, v)| {
            Parameter::builder()
                .parameter_key(k)
                .parameter_value(v)
                .build()
        })
        .collect();
    let tags: Vec<Tag> = cfg
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let created = cf
        .create_change_set()
        .stack_name(name)
        .change_set_name(&change_set_name)
        .change_set_type(if create {
            ChangeSetType::Create
        } else {
            ChangeSetType::Update
        })
        .template_body(body)
        .set_parameters(Some(parameters))
        .set_tags((!tags.is_empty()).then_some(tags))
        .capabilities(Capability::CapabilityIam)
        .description(concat!("agent-fleet ", env!("CARGO_PKG_VERSION")))
        .send()
        .await;
    let created = match created {
        Ok(c) => c,
        // Some CloudFormation front ends refuse an unchanged update outright instead of
        // making a FAILED change set.
        Err(e)
            if e.message()
                .is_some_and(|m| m.contains("No updates are to be performed")) =>
        {
            return Ok(Planned {
                id: String::new(),
                create,
                changes: vec![],
                parameter_changes,
                empty: true,
            })
        }
        Err(e) => bail!("CloudFormation refused the change set: {}", describe(&e)),
    };
    let id = created.id().unwrap_or(&change_set_name).to_string();

    let started = Instant::now();
    let mut last_note = Instant::now();
    loop {
        let mut changes = vec![];
        let mut token: Option<String> = None;
        let mut status;
        let mut reason;
        loop {
            let d = cf
                .describe_change_set()
                .change_set_name(&id)
                .stack_name(name)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("cannot describe the change set: {}", describe(&e)))?;
            status = d.status().cloned();
            reason = d.status_reason().unwrap_or_default().to_string();
            changes.extend(d.changes().iter().cloned());
            token = d.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        match status {
            Some(ChangeSetStatus::CreateComplete) => {
                return Ok(Planned {
                    id,
                    create,
                    changes,
                    parameter_changes,
                    empty: false,
                })
            }
            Some(ChangeSetStatus::Failed) => {
                if reason.contains("didn't contain changes") || reason.contains("No updates") {
                    let _ = cf
                        .delete_change_set()
                        .change_set_name(&id)
                        .stack_name(name)
                        .send()
                        .await;
                    return Ok(Planned {
                        id,
                        create,
                        changes: vec![],
                        parameter_changes,
                        empty: true,
                    });
                }
                bail!("CloudFormation could not plan the change: {reason}");
            }
            _ => {}
        }
        if last_note.elapsed() >= pace.progress_every {
            writeln!(
                out,
                "… CloudFormation is still working out the change set ({} s)",
                started.elapsed().as_secs()
            )?;
            last_note = Instant::now();
        }
        tokio::time::sleep(pace.poll).await;
    }
}

/// The change set, readable: one line per resource, then a summary.
pub fn render(p: &Planned) -> String {
    let mut s = String::new();
    if p.empty {
        s.push_str("no changes: the stack already has this configuration\n");
        return s;
    }
    if !p.parameter_changes.is_empty() {
        s.push_str("parameters:\n");
        for (k, old, new) in &p.parameter_changes {
            let show = |v: &str| {
                if v.is_empty() {
                    "(empty)".to_string()
                } else {
                    v.to_string()
                }
            };
            s.push_str(&format!("  {k}: {} → {}\n", show(old), show(new)));
        }
    }
    s.push_str("resources:\n");
    let (mut add, mut modify, mut replace, mut remove) = (0, 0, 0, 0);
    for c in &p.changes {
        let Some(rc) = c.resource_change() else {
            continue;
        };
        let action = rc.action().cloned();
        let replacement = rc.replacement().cloned();
        let (mark, word) = match (&action, &replacement) {
            (Some(ChangeAction::Add), _) => {
                add += 1;
                ("+", "add")
            }
            (Some(ChangeAction::Remove), _) => {
                remove += 1;
                ("-", "remove")
            }
            (Some(ChangeAction::Modify), Some(Replacement::True)) => {
                replace += 1;
                ("!", "replace")
            }
            (Some(ChangeAction::Modify), Some(Replacement::Conditional)) => {
                replace += 1;
                ("!", "may replace")
            }
            (Some(ChangeAction::Modify), _) => {
                modify += 1;
                ("~", "modify")
            }
            (Some(other), _) => {
                modify += 1;
                ("~", other.as_str())
            }
            (None, _) => ("?", "change"),
        };
        let scope: Vec<&str> = rc
            .details()
            .iter()
            .filter_map(|d| d.target().and_then(|t| t.name()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let scope = if scope.is_empty() {
            String::new()
        } else {
            format!("  [{}]", scope.join(", "))
        };
        s.push_str(&format!(
            "  {mark} {word:<11} {} ({}){scope}\n",
            rc.logical_resource_id().unwrap_or("?"),
            rc.resource_type().unwrap_or("?"),
        ));
    }
    if p.changes.is_empty() {
        s.push_str("  (no resource changes; parameter values only)\n");
    }
    s.push_str(&format!(
        "{add} to add, {modify} to modify, {replace} to replace, {remove} to remove\n"
    ));
    s
}

/// Shows what a deploy would do, then throws the change set away.
pub async fn diff(
    cf: &Client,
    cfg: &StackConfig,
    pace: Pace,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let existed = existing(cf, &cfg.stack_name).await?.is_some();
    let p = match plan(cf, cfg, pace, out).await {
        Ok(p) => p,
        Err(e) => {
            // A failed CREATE change set leaves an empty REVIEW_IN_PROGRESS stack behind.
            if !existed {
                let _ = cf.delete_stack().stack_name(&cfg.stack_name).send().await;
            }
            return Err(e);
        }
    };
    if p.create {
        writeln!(
            out,
            "stack {} does not exist; a deploy creates it:",
            cfg.stack_name
        )?;
    } else {
        writeln!(out, "stack {}: a deploy would change:", cfg.stack_name)?;
    }
    write!(out, "{}", render(&p))?;
    if !p.empty {
        let _ = cf
            .delete_change_set()
            .change_set_name(&p.id)
            .stack_name(&cfg.stack_name)
            .send()
            .await;
        if p.create {
            // A CREATE change set leaves an empty stack in REVIEW_IN_PROGRESS behind.
            let _ = cf.delete_stack().stack_name(&cfg.stack_name).send().await;
        }
    }
    Ok(())
}

/// Creates or updates the stack and follows it to the end.
pub async fn deploy(
    cf: &Client,
    cfg: &StackConfig,
    pace: Pace,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let p = plan(cf, cfg, pace, out).await?;
    writeln!(
        out,
        "{} stack {}:",
        if p.create { "creating" } else { "updating" },
        cfg.stack_name
    )?;
    write!(out, "{}", render(&p))?;
    if p.empty {
        return Ok(());
    }
    let seen = event_ids(cf, &cfg.stack_name).await.unwrap_or_default();
    cf.execute_change_set()
        .change_set_name(&p.id)
        .stack_name(&cfg.stack_name)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "CloudFormation refused to execute the change set: {}",
                describe(&e)
            )
        })?;
    let total = p.changes.len();
    let end = follow(cf, &cfg.stack_name, seen, total, pace, out).await?;
    match end {
        End::Done(status) => {
            writeln!(out, "stack {} is {status}", cfg.stack_name)?;
            Ok(())
        }
        End::Failed { status, failures } => {
            bail!(failure_report(&cfg.stack_name, &status, &failures))
        }
        End::Gone => bail!("stack {} disappeared while deploying", cfg.stack_name),
    }
}

/// Deletes the stack (and the leader-lease parameters its instances made).
pub async fn destroy(
    cf: &Client,
    ssm: &aws_sdk_ssm::Client,
    stack: &str,
    pace: Pace,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let current = existing(cf, stack).await?;
    // The token parameter is the operator's, not the stack's: it stays, and we say so.
    let config_parameter = agent_supervisor::config::StackIdentity::default_config_parameter(stack);
    let token_parameter = match ssm.get_parameter().name(&config_parameter).send().await {
        Ok(o) => o
            .parameter()
            .and_then(|p| p.value())
            .and_then(|json| {
                agent_supervisor::config::Settings::parse(&config_parameter, json).ok()
            })
            .map(|s| s.token_parameter),
        Err(_) => None,
    };
    if current.is_some() {
        let seen = event_ids(cf, stack).await.unwrap_or_default();
        cf.delete_stack()
            .stack_name(stack)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!("CloudFormation refused to delete {stack}: {}", describe(&e))
            })?;
        writeln!(out, "deleting stack {stack}:")?;
        match follow(cf, stack, seen, 0, pace, out).await? {
            End::Gone => writeln!(out, "stack {stack} is deleted")?,
            End::Done(status) if status == "DELETE_COMPLETE" => {
                writeln!(out, "stack {stack} is deleted")?
            }
            End::Done(status) => bail!("stack {stack} ended {status} instead of deleted"),
            End::Failed { status, failures } => bail!(failure_report(stack, &status, &failures)),
        }
    } else {
        writeln!(out, "stack {stack} does not exist")?;
    }
    let prefix = format!("/agent-fleet/{stack}/leader");
    let removed = delete_parameters_under(ssm, &prefix).await?;
    if removed > 0 {
        writeln!(
            out,
            "deleted {removed} leader-lease parameter(s) under {prefix}"
        )?;
    }
    if let Some(t) = token_parameter {
        writeln!(
            out,
            "kept the registration token parameter {t} (yours, not the stack's); delete it with `aws ssm delete-parameter --name {t}` once the agent type is retired"
        )?;
    }
    Ok(())
}

async fn delete_parameters_under(ssm: &aws_sdk_ssm::Client, path: &str) -> anyhow::Result<usize> {
    let mut names = vec![];
    let mut token = None;
    loop {
        let page = ssm
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot list {path}: {}", describe(&e)))?;
        names.extend(
            page.parameters()
                .iter()
                .filter_map(|p| p.name().map(str::to_string)),
        );
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    for chunk in names.chunks(10) {
        ssm.delete_parameters()
            .set_names(Some(chunk.to_vec()))
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot delete parameters under {path}: {}", describe(&e))
            })?;
    }
    Ok(names.len())
}

fn failure_report(stack: &str, status: &str, failures: &[StackEvent]) -> String {
    let mut s = format!("stack {stack} ended {status}");
    if failures.is_empty() {
        s.push_str(" (CloudFormation reported no failed resource)");
    }
    for f in failures {
        s.push_str(&format!(
            "\n  {} ({}) {}: {}",
            f.logical_resource_id().unwrap_or("?"),
            f.resource_type().unwrap_or("?"),
            f.resource_status().map(|s| s.as_str()).unwrap_or("?"),
            f.resource_status_reason().unwrap_or("no reason given"),
        ));
    }
    s
}

enum End {
    Done(String),
    Failed {
        status: String,
        failures: Vec<StackEvent>,
    },
    Gone,
}

/// The id of the stack's newest event: everything up to it is history.
async fn event_ids(cf: &Client, stack: &str) -> anyhow::Result<BTreeSet<String>> {
    let page = cf
        .describe_stack_events()
        .stack_name(stack)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    Ok(page
        .stack_events()
        .first()
        .and_then(|e| e.event_id())
        .map(str::to_string)
        .into_iter()
        .collect())
}

/// The events newer than any in `seen`, oldest first. Pages (newest first) only until an
/// event already seen, so a long history is not read again on every poll.
async fn new_events(
    cf: &Client,
    stack: &str,
    seen: &BTreeSet<String>,
) -> anyhow::Result<Vec<StackEvent>> {
    let mut fresh = vec![];
    let mut token = None;
    'pages: loop {
        let page = cf
            .describe_stack_events()
            .stack_name(stack)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
        for e in page.stack_events() {
            if e.event_id().is_some_and(|id| seen.contains(id)) {
                break 'pages;
            }
            fresh.push(e.clone());
        }
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    fresh.reverse();
    Ok(fresh)
}

/// Consecutive failed reads of the stack before `follow` gives up watching.
const MAX_READ_FAILURES: u32 = 10;

/// How long a settled status is believed without an event of the new operation (the
/// operation is asynchronous: right after ExecuteChangeSet or DeleteStack the stack may
/// still show the old, settled status).
const SETTLED_WITHOUT_EVENTS: Duration = Duration::from_secs(60);

fn is_failure(status: &str) -> bool {
    status.ends_with("_FAILED") || status.contains("ROLLBACK")
}

/// Prints the stack's new events until it settles; a progress line when quiet.
async fn follow(
    cf: &Client,
    stack: &str,
    mut seen: BTreeSet<String>,
    total: usize,
    pace: Pace,
    out: &mut impl Write,
) -> anyhow::Result<End> {
    let started = Instant::now();
    let mut last_news = Instant::now();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut failures: Vec<StackEvent> = vec![];
    let mut read_failures = 0;
    let mut operation_seen = false;
    loop {
        let status = match existing(cf, stack).await {
            Ok(Some(e)) => e.status,
            Ok(None) => return Ok(End::Gone),
            Err(e) => {
                read_failures += 1;
                if read_failures >= MAX_READ_FAILURES {
                    return Err(e.context(format!(
                        "gave up watching {stack} after {read_failures} failed reads; CloudFormation carries on: see `agent-fleet status`"
                    )));
                }
                writeln!(out, "… cannot read the stack ({e:#}); retrying")?;
                tokio::time::sleep(pace.poll).await;
                continue;
            }
        };
        match new_events(cf, stack, &seen).await {
            Ok(evs) => {
                read_failures = 0;
                for e in evs {
                    let Some(id) = e.event_id().map(str::to_string) else {
                        continue;
                    };
                    if !seen.insert(id) {
                        continue;
                    }
                    last_news = Instant::now();
                    let st = e.resource_status().map(|s| s.as_str()).unwrap_or("?");
                    let logical = e.logical_resource_id().unwrap_or("?");
                    let is_stack = e.resource_type() == Some("AWS::CloudFormation::Stack");
                    if is_stack {
                        operation_seen = true;
                    }
                    if st.ends_with("_COMPLETE") && !is_stack {
                        done.insert(logical.to_string());
                    }
                    if st.ends_with("_FAILED") {
                        failures.push(e.clone());
                    }
                    let when = e
                        .timestamp()
                        .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
                        .unwrap_or_default();
                    let reason = e
                        .resource_status_reason()
                        .map(|r| format!("  {r}"))
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "  {when}  {st:<28} {logical} ({}){reason}",
                        e.resource_type().unwrap_or("?")
                    )?;
                }
            }
            // The stack can vanish between the two calls.
            Err(_) if status.starts_with("DELETE") => {}
            Err(e) => {
                read_failures += 1;
                if read_failures >= MAX_READ_FAILURES {
                    return Err(e.context(format!(
                        "gave up reading the events of {stack} after {read_failures} tries; CloudFormation carries on: see `agent-fleet status`"
                    )));
                }
                writeln!(out, "… cannot read the events ({e:#}); retrying")?;
            }
        }
        let settled = !status.ends_with("_IN_PROGRESS")
            && (operation_seen || started.elapsed() >= SETTLED_WITHOUT_EVENTS);
        if settled {
            if is_failure(&status) {
                // The stack's own events say ROLLBACK; the resources' say why.
                let resource_failures: Vec<StackEvent> = failures
                    .iter()
                    .filter(|e| e.resource_type() != Some("AWS::CloudFormation::Stack"))
                    .cloned()
                    .collect();
                let failures = if resource_failures.is_empty() {
                    failures
                } else {
                    resource_failures
                };
                return Ok(End::Failed { status, failures });
            }
            return Ok(End::Done(status));
        }
        if last_news.elapsed() >= pace.progress_every {
            let of = if total > 0 {
                format!(", {} of {total} resources done", done.len().min(total))
            } else {
                String::new()
            };
            writeln!(
                out,
                "… {status} for {} s{of}; still waiting (Ctrl-C stops watching, not the deploy)",
                started.elapsed().as_secs()
            )?;
            last_news = Instant::now();
        }
        tokio::time::sleep(pace.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_cloudformation::types::{
        ChangeType, ResourceChange, ResourceChangeDetail, ResourceTargetDefinition,
    };

    fn change(
        action: ChangeAction,
        logical: &str,
        kind: &str,
        replacement: Option<Replacement>,
        target: Option<&str>,
    ) -> Change {
        let mut rc = ResourceChange::builder()
            .action(action)
            .logical_resource_id(logical)
            .resource_type(kind)
            .set_replacement(replacement);
        if let Some(t) = target {
            rc = rc.details(
                ResourceChangeDetail::builder()
                    .target(ResourceTargetDefinition::builder().name(t).build())
                    .build(),
            );
        }
        Change::builder()
            .r#type(ChangeType::Resource)
            .resource_change(rc.build())
            .build()
    }

    #[test]
    fn render_says_what_is_added_modified_replaced_and_removed() {
        let p = Planned {
            id: "cs".into(),
            create: false,
            changes: vec![
                change(
                    ChangeAction::Add,
                    "ScalerGroup",
                    "AWS::AutoScaling::AutoScalingGroup",
                    None,
                    None,
                ),
                change(
                    ChangeAction::Modify,
                    "AgentGroup",
                    "AWS::AutoScaling::AutoScalingGroup",
                    Some(Replacement::False),
                    Some("MaxSize"),
                ),
                change(
                    ChangeAction::Modify,
                    "SecurityGroup",
                    "AWS::EC2::SecurityGroup",
                    Some(Replacement::True),
                    Some("VpcId"),
                ),
                change(
                    ChangeAction::Remove,
                    "OldThing",
                    "AWS::SSM::Parameter",
                    None,
                    None,
                ),
            ],
            parameter_changes: vec![
                ("AsgMaxSize".into(), "3".into(), "5".into()),
                ("VpcId".into(), String::new(), "vpc-01234567".into()),
            ],
            empty: false,
        };
        let text = render(&p);
        for line in [
            "  AsgMaxSize: 3 → 5",
            "  VpcId: (empty) → vpc-01234567",
            "  + add         ScalerGroup (AWS::AutoScaling::AutoScalingGroup)",
            "  ~ modify      AgentGroup (AWS::AutoScaling::AutoScalingGroup)  [MaxSize]",
            "  ! replace     SecurityGroup (AWS::EC2::SecurityGroup)  [VpcId]",
            "  - remove      OldThing (AWS::SSM::Parameter)",
            "1 to add, 1 to modify, 1 to replace, 1 to remove",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }

    #[test]
    fn stacks_that_cannot_take_a_change_set_say_what_to_do() {
        assert!(
            blocked("ROLLBACK_COMPLETE", "s").is_some_and(|m| m.contains("agent-fleet destroy"))
        );
        assert!(blocked("UPDATE_IN_PROGRESS", "s").is_some_and(|m| m.contains("busy")));
        assert!(blocked("UPDATE_COMPLETE", "s").is_none());
        assert!(blocked("REVIEW_IN_PROGRESS", "s").is_none());
        assert!(
            blocked("UPDATE_ROLLBACK_COMPLETE", "s").is_none(),
            "an update that rolled back can be retried"
        );
    }
}
