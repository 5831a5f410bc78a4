//! The in-memory view of the build queue that allocation works on: pure data structures, no I/O.
//! The database is the truth; this is rebuilt from it at start and kept in step by the core.
//!
//! Queued builds are either waiting (some dependency is still queued or running) or ready. Ready
//! builds are kept per class (system and required features), each class ordered by priority
//! (highest first) then age (oldest first), so choosing a build for a free machine looks only at
//! the head of each class the machine can build: cost grows with the number of classes, not with
//! the length of the queue.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

pub use crate::db::BuildId;

/// What a machine can build.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    pub systems: Vec<String>,
    pub features: Vec<String>,
    /// Features a build must ask for to run on this machine.
    pub mandatory_features: Vec<String>,
}

impl Capabilities {
    /// Nix's rule: the system matches, the machine has every required feature, and every mandatory
    /// feature of the machine is required by the build.
    pub fn can_build(&self, system: &str, required: &BTreeSet<String>) -> bool {
        (self.systems.iter().any(|s| s == system) || system == "builtin")
            && required.iter().all(|f| self.features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| required.contains(f))
    }
}

/// Why none of `machines` can ever build a derivation for `system` with the `required` features
/// (None when one can): what `gbc submit` warns about and `gbc show` says of a waiting build.
pub fn why_no_machine<'a>(
    system: &str,
    required: &BTreeSet<String>,
    machines: impl IntoIterator<Item = &'a Capabilities> + Clone,
) -> Option<String> {
    if machines.clone().into_iter().any(|m| m.can_build(system, required)) {
        return None;
    }
    let systems: BTreeSet<&str> =
        machines.clone().into_iter().flat_map(|m| m.systems.iter().map(String::as_str)).collect();
    let listed = |set: &BTreeSet<&str>| {
        if set.is_empty() { "none".to_owned() } else { set.iter().copied().collect::<Vec<_>>().join(" ") }
    };
    if !systems.contains(system) && system != "builtin" {
        return Some(format!("no machine builds {system} (the machines build: {})", listed(&systems)));
    }
    let wanted: Vec<&str> = required.iter().map(String::as_str).collect();
    Some(format!(
        "no machine that builds {system} has the features {{{}}} (or it has mandatory features the derivation does not ask for)",
        wanted.join(", ")
    ))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Class {
    system: String,
    features: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    priority: i64,
    class: usize,
    /// Dependencies still queued or running.
    waiting: u32,
    /// Machines this build failed to set up on, tried last.
    avoid: Vec<String>,
    /// Kept out of allocation until released (a retry's wait).
    held: bool,
}

type ReadyKey = (Reverse<i64>, BuildId);

/// Queued and running builds, and who waits for whom.
#[derive(Debug, Default)]
pub struct Queue {
    classes: Vec<Class>,
    class_ids: HashMap<Class, usize>,
    ready: Vec<BTreeSet<ReadyKey>>,
    queued: HashMap<BuildId, Entry>,
    running: HashMap<BuildId, Entry>,
    /// dependency → builds waiting for it.
    dependents: HashMap<BuildId, Vec<BuildId>>,
}

/// A choice made by [`Queue::pick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub build: BuildId,
    pub machine: usize,
}

/// A machine as allocation sees it.
#[derive(Debug, Clone)]
pub struct Slot<'a> {
    pub name: &'a str,
    pub caps: &'a Capabilities,
    pub running: u32,
    pub parallel: u32,
    pub speed: f64,
}

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn is_active(&self, id: BuildId) -> bool {
        self.queued.contains_key(&id) || self.running.contains_key(&id)
    }

    fn class(&mut self, system: &str, features: &BTreeSet<String>) -> usize {
        let key = Class { system: system.to_owned(), features: features.clone() };
        if let Some(&c) = self.class_ids.get(&key) {
            return c;
        }
        let c = self.classes.len();
        self.classes.push(key.clone());
        self.class_ids.insert(key, c);
        self.ready.push(BTreeSet::new());
        c
    }

    /// Add a queued build. Dependencies that are not active (already succeeded, or unknown) are
    /// ignored; the build waits for the others.
    pub fn insert(&mut self, id: BuildId, priority: i64, system: &str, features: &BTreeSet<String>, deps: &[BuildId]) {
        let class = self.class(system, features);
        let mut waiting = 0;
        for &d in deps {
            if self.is_active(d) {
                self.dependents.entry(d).or_default().push(id);
                waiting += 1;
            }
        }
        if waiting == 0 {
            self.ready[class].insert((Reverse(priority), id));
        }
        self.queued.insert(id, Entry { priority, class, waiting, avoid: Vec::new(), held: false });
    }

    /// Choose the next build to start and the machine to start it on: the best ready build that
    /// some free machine can build (priority, then age), on the best such machine (lowest
    /// running/speed, then highest speed; machines it failed to set up on last). The build moves
    /// to running.
    pub fn pick(&mut self, slots: &[Slot<'_>]) -> Option<Pick> {
        let free: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].running < slots[i].parallel).collect();
        if free.is_empty() {
            return None;
        }
        let mut best: Option<(ReadyKey, usize)> = None;
        for (c, set) in self.ready.iter().enumerate() {
            let Some(&head) = set.first() else { continue };
            if best.is_some_and(|(b, _)| b <= head) {
                continue;
            }
            let class = &self.classes[c];
            if free.iter().any(|&m| slots[m].caps.can_build(&class.system, &class.features)) {
                best = Some((head, c));
            }
        }
        let (key, c) = best?;
        let id = key.1;
        let entry = self.queued.get(&id)?;
        let class = &self.classes[c];
        let machine =
            free.iter().copied().filter(|&m| slots[m].caps.can_build(&class.system, &class.features)).min_by(
                |&a, &b| {
                    let (sa, sb) = (&slots[a], &slots[b]);
                    let avoid_a = entry.avoid.iter().any(|n| n == sa.name);
                    let avoid_b = entry.avoid.iter().any(|n| n == sb.name);
                    avoid_a
                        .cmp(&avoid_b)
                        .then((f64::from(sa.running) / sa.speed).total_cmp(&(f64::from(sb.running) / sb.speed)))
                        .then(sb.speed.total_cmp(&sa.speed))
                },
            )?;
        self.ready[c].remove(&key);
        let entry = self.queued.remove(&id)?;
        self.running.insert(id, entry);
        Some(Pick { build: id, machine })
    }

    /// A running build goes back to the queue (its machine was lost, or it could not be set up
    /// there: then `avoid` names that machine).
    pub fn requeue(&mut self, id: BuildId, avoid: Option<&str>) {
        if let Some(mut entry) = self.running.remove(&id) {
            if let Some(m) = avoid
                && !entry.avoid.iter().any(|a| a == m)
            {
                entry.avoid.push(m.to_owned());
            }
            if entry.waiting == 0 {
                self.ready[entry.class].insert((Reverse(entry.priority), id));
            }
            self.queued.insert(id, entry);
        }
    }

    /// Put a running build back, but out of allocation until [`Queue::release`] (a retry after a
    /// wait), preferring other machines than `avoid`.
    pub fn requeue_held(&mut self, id: BuildId, avoid: Option<&str>) {
        if let Some(mut entry) = self.running.remove(&id) {
            if let Some(m) = avoid
                && !entry.avoid.iter().any(|a| a == m)
            {
                entry.avoid.push(m.to_owned());
            }
            entry.held = true;
            entry.waiting += 1;
            self.queued.insert(id, entry);
        }
    }

    /// A held build may be allocated again (once its dependencies are done).
    pub fn release(&mut self, id: BuildId) {
        if let Some(e) = self.queued.get_mut(&id)
            && e.held
        {
            e.held = false;
            e.waiting -= 1;
            if e.waiting == 0 {
                self.ready[e.class].insert((Reverse(e.priority), id));
            }
        }
    }

    /// Put a running build back to wait for `deps` (those still active) first.
    pub fn requeue_after(&mut self, id: BuildId, deps: &[BuildId]) {
        if let Some(mut entry) = self.running.remove(&id) {
            for &d in deps {
                if d != id && self.is_active(d) {
                    self.dependents.entry(d).or_default().push(id);
                    entry.waiting += 1;
                }
            }
            if entry.waiting == 0 {
                self.ready[entry.class].insert((Reverse(entry.priority), id));
            }
            self.queued.insert(id, entry);
        }
    }

    /// A build succeeded: returns the builds that became ready.
    pub fn succeeded(&mut self, id: BuildId) -> Vec<BuildId> {
        self.running.remove(&id);
        self.queued.remove(&id);
        let mut now_ready = Vec::new();
        for d in self.dependents.remove(&id).unwrap_or_default() {
            if let Some(e) = self.queued.get_mut(&d) {
                e.waiting = e.waiting.saturating_sub(1);
                if e.waiting == 0 {
                    self.ready[e.class].insert((Reverse(e.priority), d));
                    now_ready.push(d);
                }
            }
        }
        now_ready
    }

    /// A build failed or was canceled: it leaves the queue, and so does every queued build that
    /// waits for it, directly or not. Returns those dependents (they fail for this cause), each
    /// with the build it was waiting for.
    pub fn failed(&mut self, id: BuildId) -> Vec<(BuildId, BuildId)> {
        self.remove(id);
        let mut out = Vec::new();
        let mut stack = vec![id];
        while let Some(cur) = stack.pop() {
            for d in self.dependents.remove(&cur).unwrap_or_default() {
                if self.queued.contains_key(&d) {
                    self.remove(d);
                    out.push((d, cur));
                    stack.push(d);
                }
            }
        }
        out
    }

    fn remove(&mut self, id: BuildId) {
        self.running.remove(&id);
        if let Some(e) = self.queued.remove(&id) {
            self.ready[e.class].remove(&(Reverse(e.priority), id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn why_no_machine_names_the_missing_system_or_features() {
        let x86 = caps(&["x86_64-linux"], &["kvm"], &[]);
        let big = caps(&["x86_64-linux", "i686-linux"], &[], &["big"]);
        let machines = [&x86, &big];
        assert_eq!(why_no_machine("x86_64-linux", &set(&["kvm"]), machines), None);
        assert_eq!(why_no_machine("builtin", &set(&[]), machines), None);
        assert_eq!(
            why_no_machine("riscv64-linux", &set(&[]), machines).as_deref(),
            Some("no machine builds riscv64-linux (the machines build: i686-linux x86_64-linux)")
        );
        let why = why_no_machine("i686-linux", &set(&["kvm"]), machines).unwrap_or_default();
        assert!(why.starts_with("no machine that builds i686-linux has the features {kvm}"), "{why}");
        assert_eq!(
            why_no_machine("x86_64-linux", &set(&[]), []).as_deref(),
            Some("no machine builds x86_64-linux (the machines build: none)")
        );
    }

    fn caps(systems: &[&str], features: &[&str], mandatory: &[&str]) -> Capabilities {
        Capabilities {
            systems: systems.iter().map(|s| s.to_string()).collect(),
            features: features.iter().map(|s| s.to_string()).collect(),
            mandatory_features: mandatory.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn set(f: &[&str]) -> BTreeSet<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    fn slot<'a>(name: &'a str, caps: &'a Capabilities, running: u32, parallel: u32, speed: f64) -> Slot<'a> {
        Slot { name, caps, running, parallel, speed }
    }

    #[test]
    fn features_follow_nix_rules() {
        let m = caps(&["x86_64-linux"], &["kvm", "big-parallel"], &["benchmark"]);
        assert!(!m.can_build("x86_64-linux", &set(&[])), "mandatory feature not requested");
        assert!(m.can_build("x86_64-linux", &set(&["benchmark"])));
        assert!(m.can_build("x86_64-linux", &set(&["benchmark", "kvm"])));
        assert!(!m.can_build("x86_64-linux", &set(&["benchmark", "nixos-test"])));
        assert!(!m.can_build("aarch64-linux", &set(&["benchmark"])));
    }

    #[test]
    fn priority_then_age() {
        let m = caps(&["x"], &[], &[]);
        let mut q = Queue::new();
        q.insert(1, 0, "x", &set(&[]), &[]);
        q.insert(2, 5, "x", &set(&[]), &[]);
        q.insert(3, 5, "x", &set(&[]), &[]);
        q.insert(4, -1, "x", &set(&[]), &[]);
        let slots = [slot("m", &m, 0, 10, 1.0)];
        let order: Vec<BuildId> = std::iter::from_fn(|| q.pick(&slots).map(|p| p.build)).collect();
        assert_eq!(order, [2, 3, 1, 4]);
    }

    #[test]
    fn parallel_builds_is_a_hard_limit_and_systems_must_match() {
        let m = caps(&["x"], &[], &[]);
        let mut q = Queue::new();
        q.insert(1, 0, "y", &set(&[]), &[]);
        q.insert(2, 0, "x", &set(&[]), &[]);
        assert_eq!(q.pick(&[slot("m", &m, 1, 1, 1.0)]), None);
        assert_eq!(q.pick(&[slot("m", &m, 0, 1, 1.0)]), Some(Pick { build: 2, machine: 0 }));
        assert_eq!(q.pick(&[slot("m", &m, 0, 1, 1.0)]), None, "nobody builds y");
        assert_eq!(q.queued_len(), 1);
    }

    #[test]
    fn machines_by_load_over_speed_then_speed() {
        let m = caps(&["x"], &[], &[]);
        let mut q = Queue::new();
        for i in 1..=3 {
            q.insert(i, 0, "x", &set(&[]), &[]);
        }
        // slow: 1 running / speed 1 = 1; fast: 2 running / speed 4 = 0.5 → fast.
        let slots = [slot("slow", &m, 1, 8, 1.0), slot("fast", &m, 2, 8, 4.0)];
        assert_eq!(q.pick(&slots).map(|p| p.machine), Some(1));
        // Equal load/speed: the faster one.
        let slots = [slot("slow", &m, 0, 8, 1.0), slot("fast", &m, 0, 8, 4.0)];
        assert_eq!(q.pick(&slots).map(|p| p.machine), Some(1));
        // A machine the build could not be set up on comes last.
        let id = 3;
        assert_eq!(q.pick(&slots), Some(Pick { build: id, machine: 1 }));
        q.requeue(id, Some("fast"));
        assert_eq!(q.pick(&slots), Some(Pick { build: id, machine: 0 }));
    }

    #[test]
    fn a_running_build_can_go_back_to_wait_for_new_dependencies() {
        let m = caps(&["x"], &[], &[]);
        let slots = [slot("m", &m, 0, 10, 1.0)];
        let mut q = Queue::new();
        q.insert(1, 5, "x", &set(&[]), &[]);
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(1));
        // 1 lacks an input that 2 makes; 3 is a dependency that is no longer active.
        q.insert(2, 0, "x", &set(&[]), &[]);
        q.requeue_after(1, &[2, 3]);
        assert_eq!(q.queued_len(), 2);
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(2), "1 waits despite its priority");
        assert_eq!(q.pick(&slots), None);
        assert_eq!(q.succeeded(2), [1]);
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(1));
    }

    #[test]
    fn dependencies_wait_and_failures_cascade() {
        let m = caps(&["x"], &[], &[]);
        let slots = [slot("m", &m, 0, 10, 1.0)];
        let mut q = Queue::new();
        // 1 ← 2 ← 3, 1 ← 4; 5 depends on a build that is not active (already done).
        q.insert(1, 0, "x", &set(&[]), &[]);
        q.insert(2, 9, "x", &set(&[]), &[1]);
        q.insert(3, 9, "x", &set(&[]), &[2]);
        q.insert(4, 9, "x", &set(&[]), &[1]);
        q.insert(5, 0, "x", &set(&[]), &[77]);
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(1));
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(5));
        assert_eq!(q.pick(&slots), None, "2, 3, 4 wait for 1");
        assert_eq!(q.succeeded(1), [2, 4]);
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(2));
        let mut cascade = q.failed(2);
        cascade.sort();
        assert_eq!(cascade, [(3, 2)]);
        assert_eq!(q.pick(&slots).map(|p| p.build), Some(4));
        assert_eq!(q.queued_len(), 0);
    }

    #[test]
    fn picking_does_not_scan_the_queue() {
        // 100k ready builds of a system nobody has must not slow down picking another class.
        let m = caps(&["x"], &[], &[]);
        let mut q = Queue::new();
        for i in 0..100_000 {
            q.insert(i, 0, "other", &set(&[]), &[]);
        }
        q.insert(100_000, 0, "x", &set(&[]), &[]);
        assert_eq!(q.pick(&[slot("m", &m, 0, 1, 1.0)]).map(|p| p.build), Some(100_000));
    }
}
