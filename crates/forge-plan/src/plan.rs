//! The artifact graph: one node per `TARGET:STAGE[:VARIANT]`, edges from each artifact to
//! those that read it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use forge_manifest::{ArtifactDecl, ArtifactId, Manifest, artifact};
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::executor::{Executor, Registry, StagePlan};

pub struct Node {
    pub id: ArtifactId,
    pub decl: ArtifactDecl,
    /// `None` when this forge has no executor for the stage kind.
    pub executor: Option<Arc<dyn Executor>>,
    pub plan: StagePlan,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        self.decl.kind.name()
    }
}

pub struct Plan {
    /// Edges point from an artifact to the artifacts that read it.
    pub graph: DiGraph<Node, ()>,
    index: HashMap<ArtifactId, NodeIndex>,
    /// All nodes, dependencies first.
    order: Vec<NodeIndex>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectError {
    #[error("no target named `{name}`{}", hint(.suggestion))]
    UnknownTarget { name: String, suggestion: Option<String> },
    #[error("no artifact named `{name}`{}", hint(.suggestion))]
    UnknownArtifact { name: String, suggestion: Option<String> },
    #[error("no selected target has a stage `{stage}`{}", hint(.suggestion))]
    UnknownStage { stage: String, suggestion: Option<String> },
}

fn hint(s: &Option<String>) -> String {
    s.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
}

/// A topological order that, among artifacts free to go, keeps declaration order: builds and
/// listings follow the manifest as written. (Kahn's algorithm with a min-heap on node index.)
fn declaration_order_toposort(graph: &DiGraph<Node, ()>) -> Vec<NodeIndex> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut indegree: Vec<usize> =
        graph.node_indices().map(|n| graph.neighbors_directed(n, Direction::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<NodeIndex>> =
        graph.node_indices().filter(|n| indegree[n.index()] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(graph.node_count());
    while let Some(Reverse(n)) = ready.pop() {
        order.push(n);
        for d in graph.neighbors_directed(n, Direction::Outgoing) {
            indegree[d.index()] -= 1;
            if indegree[d.index()] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    assert_eq!(order.len(), graph.node_count(), "validated manifests have no dependency cycle");
    order
}

impl Plan {
    /// Plans every artifact the manifest declares. The manifest is validated, so the graph is
    /// acyclic and every dependency resolves.
    pub fn new(manifest: &Manifest, registry: &Registry) -> Plan {
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        let decls = artifact::expand(manifest);
        for decl in &decls {
            let executor = registry.get(decl.kind.name());
            let mut plan = executor.as_ref().map(|e| e.plan(manifest, decl)).unwrap_or_default();
            if let Some(tools) = registry.tools(decl.kind.name()) {
                plan.tools.extend(tools.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            let n = graph.add_node(Node { id: decl.id.clone(), decl: decl.clone(), executor, plan });
            index.insert(decl.id.clone(), n);
        }
        for decl in &decls {
            for dep in &decl.deps {
                if let Some(&from) = index.get(&dep.id) {
                    graph.add_edge(from, index[&decl.id], ());
                }
            }
        }
        let order = declaration_order_toposort(&graph);
        Plan { graph, index, order }
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn node(&self, id: &ArtifactId) -> Option<NodeIndex> {
        self.index.get(id).copied()
    }

    pub fn order(&self) -> &[NodeIndex] {
        &self.order
    }

    /// Direct upstream artifacts of `n`, in declaration order.
    pub fn deps(&self, n: NodeIndex) -> Vec<NodeIndex> {
        self.graph[n].decl.deps.iter().filter_map(|d| self.node(&d.id)).collect()
    }

    pub fn dependents(&self, n: NodeIndex) -> impl Iterator<Item = NodeIndex> + '_ {
        self.graph.neighbors_directed(n, Direction::Outgoing)
    }

    /// Resolves command-line selections to artifacts plus everything they need, dependencies
    /// first. An argument is a target (`defame`), an artifact (`defame:gguf:q4_0`), or a stage
    /// with all its variants (`defame:gguf`); none selects everything. `until` keeps, of each
    /// selected target, the artifacts of that stage (`adapter`, `gguf`, `gguf:q4_0`), and then
    /// adds what they need.
    pub fn select(&self, args: &[String], until: Option<&str>) -> Result<Vec<NodeIndex>, SelectError> {
        let all_names: Vec<String> = self.order.iter().map(|n| self.graph[*n].id.to_string()).collect();
        let targets: BTreeSet<&str> = self.order.iter().map(|n| self.graph[*n].id.target.as_str()).collect();
        let mut roots: Vec<NodeIndex> = Vec::new();
        if args.is_empty() {
            roots.extend(self.order.iter().copied());
        }
        for arg in args {
            if !arg.contains(':') {
                if !targets.contains(arg.as_str()) {
                    let suggestion = forge_manifest::closest(arg, targets.iter().copied()).map(str::to_string);
                    return Err(SelectError::UnknownTarget { name: arg.clone(), suggestion });
                }
                roots.extend(self.order.iter().copied().filter(|n| self.graph[*n].id.target == *arg));
                continue;
            }
            let matched: Vec<NodeIndex> = self
                .order
                .iter()
                .copied()
                .filter(|n| {
                    let id = self.graph[*n].id.to_string();
                    id == *arg || id.strip_prefix(arg.as_str()).is_some_and(|rest| rest.starts_with(':'))
                })
                .collect();
            if matched.is_empty() {
                let suggestion = forge_manifest::closest(arg, all_names.iter().map(String::as_str)).map(str::to_string);
                return Err(SelectError::UnknownArtifact { name: arg.clone(), suggestion });
            }
            roots.extend(matched);
        }
        if let Some(stage) = until {
            let matches = |id: &ArtifactId| id.stage == stage || id.local_name() == stage;
            let kept: Vec<NodeIndex> = roots.iter().copied().filter(|n| matches(&self.graph[*n].id)).collect();
            if kept.is_empty() {
                let names: BTreeSet<String> = roots.iter().map(|n| self.graph[*n].id.stage.clone()).collect();
                let suggestion = forge_manifest::closest(stage, names.iter().map(String::as_str)).map(str::to_string);
                return Err(SelectError::UnknownStage { stage: stage.to_string(), suggestion });
            }
            roots = kept;
        }
        Ok(self.closure(&roots))
    }

    /// `roots` and everything they depend on, dependencies first.
    pub fn closure(&self, roots: &[NodeIndex]) -> Vec<NodeIndex> {
        let mut keep = vec![false; self.graph.node_count()];
        let mut stack: Vec<NodeIndex> = roots.to_vec();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut keep[n.index()], true) {
                continue;
            }
            stack.extend(self.graph.neighbors_directed(n, Direction::Incoming));
        }
        self.order.iter().copied().filter(|n| keep[n.index()]).collect()
    }

    /// Graphviz DOT.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph forge {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n");
        for &n in &self.order {
            let node = &self.graph[n];
            out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", node.id, node.id, node.kind()));
        }
        for &n in &self.order {
            for d in self.deps(n) {
                out.push_str(&format!("  \"{}\" -> \"{}\";\n", self.graph[d].id, self.graph[n].id));
            }
        }
        out.push_str("}\n");
        out
    }

    /// A JSON description: nodes with kind, pool and dependencies.
    pub fn to_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct JsonNode {
            artifact: String,
            target: String,
            stage: String,
            variant: Option<String>,
            kind: &'static str,
            pool: Option<String>,
            deps: Vec<String>,
            available: bool,
        }
        let nodes: Vec<JsonNode> = self
            .order
            .iter()
            .map(|&n| {
                let node = &self.graph[n];
                JsonNode {
                    artifact: node.id.to_string(),
                    target: node.id.target.clone(),
                    stage: node.id.stage.clone(),
                    variant: node.id.variant.clone(),
                    kind: node.kind(),
                    pool: node.decl.pool.clone(),
                    deps: self.deps(n).into_iter().map(|d| self.graph[d].id.to_string()).collect(),
                    available: node.executor.is_some(),
                }
            })
            .collect();
        serde_json::json!({ "artifacts": nodes })
    }
}
