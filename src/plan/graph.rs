//! A plan's phases and edges, packed in contiguous arrays: what a reconcile's passes over
//! every node read (see [`super::Plan`]).

use super::{Node, NodeId, Phase};

/// The plan's edges and phases, packed (see [`super::Plan`]).
#[derive(Clone, Debug, Default)]
pub(super) struct Graph {
    /// Each node's phase.
    pub(super) phases: Vec<Phase>,
    /// Node `i`'s inputs are `inputs[input_at[i]..input_at[i + 1]]`.
    input_at: Vec<usize>,
    inputs: Vec<NodeId>,
    /// Node `i`'s dependents are `dependents[dependent_at[i]..dependent_at[i + 1]]`.
    dependent_at: Vec<usize>,
    dependents: Vec<NodeId>,
}

impl Graph {
    pub(super) fn of(nodes: &[Node]) -> Graph {
        let mut graph = Graph {
            phases: nodes.iter().map(|n| n.phase).collect(),
            input_at: Vec::with_capacity(nodes.len() + 1),
            ..Graph::default()
        };
        graph.input_at.push(0);
        let mut counts = vec![0usize; nodes.len()];
        for node in nodes {
            graph.inputs.extend_from_slice(&node.deps);
            graph.input_at.push(graph.inputs.len());
            for &dep in &node.deps {
                counts[dep] += 1;
            }
        }
        // Dependents in plan order, as the inputs are listed.
        graph.dependent_at = std::iter::once(0)
            .chain(counts.iter().scan(0, |sum, &c| {
                *sum += c;
                Some(*sum)
            }))
            .collect();
        let mut next = graph.dependent_at.clone();
        graph.dependents = vec![0; graph.inputs.len()];
        for (id, node) in nodes.iter().enumerate() {
            for &dep in &node.deps {
                graph.dependents[next[dep]] = id;
                next[dep] += 1;
            }
        }
        graph
    }

    pub(super) fn inputs(&self, id: NodeId) -> &[NodeId] {
        &self.inputs[self.input_at[id]..self.input_at[id + 1]]
    }

    pub(super) fn dependents(&self, id: NodeId) -> &[NodeId] {
        &self.dependents[self.dependent_at[id]..self.dependent_at[id + 1]]
    }
}
