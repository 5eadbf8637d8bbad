//! `status`: what an operator wants to see at 3 a.m. — the stack, the groups and their
//! instances, who leads and since when, what the scaler last decided, and the jobs.
//! Each part that cannot be read says why and the rest is still shown.

use crate::describe;
use crate::ec2::{Ec2Instance, QueryEc2};
use agent_supervisor::config::Settings;
use agent_supervisor::election::Record;
use agent_supervisor::scaler::{Demand, HttpDemand, Token};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

/// Refuses a deploy whose token parameter does not exist yet (instances would boot and
/// fail to register).
pub async fn require_token(ssm: &aws_sdk_ssm::Client, name: &str) -> anyhow::Result<()> {
    match ssm.get_parameter().name(name).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("ParameterNotFound") => anyhow::bail!(
            "the token parameter {name} (SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME) does not exist: store the agent type's registration token first with `agent-fleet token set`"
        ),
        Err(e) => anyhow::bail!("cannot check the token parameter {name}: {}", describe(&e)),
    }
}

/// `1h02m`, `4m10s`, `12s`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn since(t: SystemTime) -> String {
    SystemTime::now()
        .duration_since(t)
        .map(age)
        .unwrap_or_else(|_| "0s".into())
}

fn utc(t: SystemTime) -> String {
    aws_smithy_types::DateTime::from(t)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

/// The newest term under `prefix`: (term, value, last modified).
async fn newest_term(
    ssm: &aws_sdk_ssm::Client,
    prefix: &str,
) -> anyhow::Result<Option<(u64, String, Option<SystemTime>)>> {
    let mut best: Option<(u64, String, Option<SystemTime>)> = None;
    let mut token = None;
    loop {
        let page = ssm
            .get_parameters_by_path()
            .path(prefix)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot list {prefix}: {}", describe(&e)))?;
        for p in page.parameters() {
            let Some(term) = p
                .name()
                .and_then(|n| n.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if best.as_ref().is_none_or(|(b, _, _)| term > *b) {
                let modified = p
                    .last_modified_date()
                    .and_then(|d| SystemTime::try_from(*d).ok());
                best = Some((term, p.value().unwrap_or_default().to_string(), modified));
            }
        }
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    Ok(best)
}

pub async fn print(
    sdk: &aws_config::SdkConfig,
    stack: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let cf = aws_sdk_cloudformation::Client::new(sdk);
    let asg = aws_sdk_autoscaling::Client::new(sdk);
    let ssm = aws_sdk_ssm::Client::new(sdk);

    match crate::cfn::existing(&cf, stack).await? {
        Some(s) => writeln!(out, "stack {stack}: {}", s.status)?,
        None => {
            writeln!(
                out,
                "stack {stack} does not exist (deploy it with `agent-fleet deploy`)"
            )?;
            return Ok(());
        }
    }

    // Groups and instances.
    let names = [format!("{stack}-agents"), format!("{stack}-scaler")];
    let groups = asg
        .describe_auto_scaling_groups()
        .set_auto_scaling_group_names(Some(names.to_vec()))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot describe the groups: {}", describe(&e)))?;
    let ids: Vec<String> = groups
        .auto_scaling_groups()
        .iter()
        .flat_map(|g| g.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    let mut ec2_note = None;
    let ec2: BTreeMap<String, Ec2Instance> = if ids.is_empty() {
        BTreeMap::new()
    } else {
        let described = match QueryEc2::new(sdk) {
            Ok(c) => c.describe_instances(&ids).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match described {
            Ok(list) => list.into_iter().map(|i| (i.id.clone(), i)).collect(),
            Err(e) => {
                ec2_note = Some(e);
                BTreeMap::new()
            }
        }
    };
    for name in &names {
        let Some(g) = groups
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name.as_str()))
        else {
            if name.ends_with("-agents") {
                writeln!(out, "group {name}: not found")?;
            }
            continue;
        };
        let suspended: Vec<&str> = g
            .suspended_processes()
            .iter()
            .filter_map(|p| p.process_name())
            .collect();
        writeln!(
            out,
            "group {name}: desired {} (min {}, max {}), {} instance(s){}",
            g.desired_capacity().unwrap_or_default(),
            g.min_size().unwrap_or_default(),
            g.max_size().unwrap_or_default(),
            g.instances().len(),
            if suspended.is_empty() {
                String::new()
            } else {
                format!("; suspended: {}", suspended.join(", "))
            }
        )?;
        for i in g.instances() {
            let id = i.instance_id().unwrap_or("?");
            let (state, age, kind) = match ec2.get(id) {
                Some(e) => (
                    e.state.clone(),
                    format!("age {}", since(e.launch_time)),
                    e.lifecycle.clone().unwrap_or_else(|| "on-demand".into()),
                ),
                None => ("?".into(), "age ?".into(), String::new()),
            };
            writeln!(
                out,
                "  {id}  {:<12} {:<9} {:<10} {age:<12} {} {kind}",
                i.lifecycle_state().map(|s| s.as_str()).unwrap_or("?"),
                i.health_status().unwrap_or("?"),
                state,
                i.instance_type().unwrap_or_default(),
            )?;
        }
    }
    if let Some(e) = ec2_note {
        writeln!(out, "  (instance state and age unavailable: {e})")?;
    }
    warm_pool(&asg, &names[0], out).await?;
    next_scheduled_change(&asg, &names[0], out).await?;

    // The runtime config says where the leader lease and Semaphore are.
    let config_parameter = agent_supervisor::config::StackIdentity::default_config_parameter(stack);
    let settings = match ssm.get_parameter().name(&config_parameter).send().await {
        Ok(o) => {
            let json = o
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .to_string();
            Settings::parse(&config_parameter, &json).map_err(|e| e.to_string())
        }
        Err(e) => Err(format!("cannot read {config_parameter}: {}", describe(&e))),
    };
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            writeln!(out, "config: {e}")?;
            return Ok(());
        }
    };

    // Leader.
    if !settings.scaler.enabled {
        writeln!(out, "leader: none (dynamic scaling is off)")?;
    } else {
        match newest_term(&ssm, &settings.election.prefix).await {
            Ok(None) => writeln!(
                out,
                "leader: none yet (no term under {}; an instance starts one when it boots)",
                settings.election.prefix
            )?,
            Ok(Some((term, value, modified))) => match Record::parse(&value) {
                Ok(r) => {
                    let written = modified.map(since).unwrap_or_else(|| "?".into());
                    let stale = modified
                        .and_then(|m| SystemTime::now().duration_since(m).ok())
                        .is_some_and(|d| d > r.lease());
                    let state = if r.released {
                        "released; the next candidate takes over".to_string()
                    } else if stale {
                        format!(
                            "NOT RENEWED for longer than its {} s lease; a new leader takes over",
                            r.lease().as_secs()
                        )
                    } else {
                        "renewing".to_string()
                    };
                    writeln!(
                        out,
                        "leader: {} (term {term}, last renewed {written} ago, {state})",
                        r.holder_instance()
                    )?;
                    match &r.decision {
                        Some(d) => writeln!(out, "last scaling decision: {}", render_decision(d))?,
                        None => {
                            writeln!(out, "last scaling decision: none recorded in this term yet")?
                        }
                    }
                }
                Err(e) => writeln!(out, "leader: term {term} has an unreadable record: {e}")?,
            },
            Err(e) => writeln!(out, "leader: {e}")?,
        }
    }

    // Jobs, as the scaler sees them.
    let jobs = async {
        let token = ssm
            .get_parameter()
            .name(&settings.token_parameter)
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot read the token parameter {}: {}",
                    settings.token_parameter,
                    describe(&e)
                )
            })?
            .parameter()
            .and_then(|p| p.value())
            .map(|v| Token::new(v.trim().to_string()))
            .ok_or_else(|| format!("the token parameter {} is empty", settings.token_parameter))?;
        let demand = HttpDemand::new().map_err(|e| e.to_string())?;
        demand
            .metrics(&settings.endpoint, !settings.no_https, &token)
            .await
            .map_err(|e| e.to_string())
    };
    match jobs.await {
        Ok(m) => writeln!(
            out,
            "jobs: {} queued, {} running; agents: {} idle, {} occupied ({})",
            m.jobs.queued, m.jobs.running, m.agents.idle, m.agents.occupied, settings.endpoint
        )?,
        Err(e) => writeln!(out, "jobs: unavailable: {e}")?,
    }
    Ok(())
}

/// The agents group's warm pool, if it has one: size, state and its instances.
async fn warm_pool(
    asg: &aws_sdk_autoscaling::Client,
    group: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut instances = vec![];
    let mut config = None;
    let mut token = None;
    loop {
        let page = match asg
            .describe_warm_pool()
            .auto_scaling_group_name(group)
            .set_next_token(token)
            .send()
            .await
        {
            Ok(p) => p,
            Err(e) => {
                writeln!(out, "warm pool: unavailable: {}", describe(&e))?;
                return Ok(());
            }
        };
        config = config.or(page.warm_pool_configuration().cloned());
        instances.extend(page.instances().iter().cloned());
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    let Some(c) = config else {
        return Ok(());
    };
    let prepared = match c.max_group_prepared_capacity() {
        Some(p) if p >= 0 => format!(", max prepared {p}"),
        _ => String::new(),
    };
    writeln!(
        out,
        "warm pool: {} instance(s) (min {}{prepared}), {}, reuse on scale-in {}{}",
        instances.len(),
        c.min_size().unwrap_or_default(),
        c.pool_state().map(|s| s.as_str()).unwrap_or("Stopped"),
        if c.instance_reuse_policy()
            .and_then(|r| r.reuse_on_scale_in())
            .unwrap_or(false)
        {
            "on"
        } else {
            "off"
        },
        c.status()
            .map(|s| format!("; {}", s.as_str()))
            .unwrap_or_default(),
    )?;
    for i in &instances {
        writeln!(
            out,
            "  {}  {:<22} {}",
            i.instance_id().unwrap_or("?"),
            i.lifecycle_state().map(|s| s.as_str()).unwrap_or("?"),
            i.instance_type().unwrap_or_default(),
        )?;
    }
    Ok(())
}

/// The next of the agents group's scheduled actions. AWS returns each recurring action's
/// next StartTime; moto does not, so a recurrence of the shape the CLI writes is also
/// computed here (in the action's time zone) and the earlier of the two is shown.
async fn next_scheduled_change(
    asg: &aws_sdk_autoscaling::Client,
    group: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut actions = vec![];
    let mut token = None;
    loop {
        let page = match asg
            .describe_scheduled_actions()
            .auto_scaling_group_name(group)
            .set_next_token(token)
            .send()
            .await
        {
            Ok(p) => p,
            Err(e) => {
                writeln!(out, "schedule: unavailable: {}", describe(&e))?;
                return Ok(());
            }
        };
        actions.extend(page.scheduled_update_group_actions().iter().cloned());
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    if actions.is_empty() {
        return Ok(());
    }
    let now = jiff::Timestamp::now();
    let mut next: Option<(jiff::Timestamp, String, String)> = None;
    for a in &actions {
        let zone_name = a.time_zone().unwrap_or("UTC");
        let Ok(tz) = crate::schedule::time_zone(zone_name) else {
            continue;
        };
        let recurrence = a
            .recurrence()
            .and_then(crate::schedule::Recurrence::from_cron);
        let computed = recurrence.and_then(|r| r.next_after(now, &tz));
        let given = a
            .start_time()
            .and_then(|t| jiff::Timestamp::from_second(t.secs()).ok())
            .filter(|t| *t > now);
        let Some(at) = [computed.map(|z| z.timestamp()), given]
            .into_iter()
            .flatten()
            .min()
        else {
            continue;
        };
        if next.as_ref().is_some_and(|(t, _, _)| *t <= at) {
            continue;
        }
        let local = at
            .to_zoned_datetime(tz)
            .strftime("%a %Y-%m-%d %H:%M %Z")
            .to_string();
        let mut change = vec![];
        if let Some(m) = a.min_size() {
            change.push(format!("min {m}"));
        }
        if let Some(m) = a.max_size() {
            change.push(format!("max {m}"));
        }
        if let Some(d) = a.desired_capacity() {
            change.push(format!("desired {d}"));
        }
        let what = format!(
            "{} ({}{})",
            change.join(", "),
            recurrence.map_or_else(
                || a.recurrence().unwrap_or("once").to_string(),
                |r| r.to_string()
            ),
            if zone_name == "UTC" {
                String::new()
            } else {
                format!(" {zone_name}")
            }
        );
        next = Some((at, local, what));
    }
    match next {
        Some((at, local, what)) => {
            let secs = at.as_second() - now.as_second();
            writeln!(
                out,
                "next scheduled change: {local} (in {}): {what}; {} scheduled action(s)",
                age(Duration::from_secs(secs.max(0) as u64)),
                actions.len()
            )?
        }
        None => writeln!(
            out,
            "schedule: {} scheduled action(s), none upcoming",
            actions.len()
        )?,
    }
    Ok(())
}

fn render_decision(d: &agent_supervisor::scaler::Decision) -> String {
    let when = std::time::UNIX_EPOCH + Duration::from_millis(d.at_unix_ms);
    let n = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let mut s = format!("{} ({} ago): {}", utc(when), since(when), d.action);
    if d.queued.is_some() || d.running.is_some() {
        s.push_str(&format!(
            "; jobs {} queued + {} running",
            n(d.queued.map(|v| v.to_string())),
            n(d.running.map(|v| v.to_string()))
        ));
    }
    if let Some(t) = d.target {
        s.push_str(&format!(" → target {t}"));
    }
    if d.desired_before.is_some() || d.desired_after.is_some() {
        s.push_str(&format!(
            ", desired {} → {}",
            n(d.desired_before.map(|v| v.to_string())),
            n(d.desired_after.map(|v| v.to_string()))
        ));
    }
    if let Some(r) = &d.reason {
        s.push_str(&format!(" ({r})"));
    }
    s
}
