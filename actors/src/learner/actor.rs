//! The Learner actor: owns the trainable model and its optimizer, and takes one step per
//! message. Its state leaves only as values (`ExportState`, `Weights`): the supervisor stores
//! checkpoints, the policy takes weights.
//!
//! Steps are CPU (or GPU) work that runs to completion: the handler runs them with
//! `block_in_place`, so the other actors' async workers are not starved.

use std::collections::BTreeMap;

use candle_core::Tensor;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::optim::AdamW;
use super::precision::MixedPrecision;
use super::rl::rl_step;
use super::sft::sft_step;
use super::split::SubTrajectory;
use crate::messages::{LearnerFailure, LearnerMsg};
use crate::policy::model::Llama;
use crate::policy::on_compute_pool;

pub struct LearnerArgs {
    /// Built over the optimizer's variables (a `VarMap` model): a step changes it in place.
    /// With `precision`, built over its compute copies instead.
    pub model: Llama,
    /// The optimizer over the f32 master weights.
    pub opt: AdamW,
    /// Mixed precision: the model computes in bf16 over copies of `opt`'s f32 masters, which
    /// every step re-syncs after the update.
    pub precision: Option<MixedPrecision>,
    /// The frozen reference of RL's KL term (design §6: the SFT result); `None` outside RL.
    pub reference: Option<Llama>,
}

pub struct Learner;

impl Learner {
    fn weights(opt: &AdamW) -> BTreeMap<String, Tensor> {
        opt.names()
            .zip(opt.vars())
            .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
            .collect()
    }
}

impl Actor for Learner {
    type Msg = LearnerMsg;
    type State = LearnerArgs;
    type Arguments = LearnerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<LearnerMsg>,
        args: LearnerArgs,
    ) -> Result<LearnerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<LearnerMsg>,
        msg: LearnerMsg,
        state: &mut LearnerArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LearnerMsg::SftStep {
                micro,
                lr,
                max_grad_norm,
                reply,
            } => {
                // On the compute pool: the step's parallel loops run from a pool thread
                // instead of parking this one on each (`on_compute_pool`).
                let out = tokio::task::block_in_place(|| {
                    on_compute_pool(|| {
                        let rows: Vec<Vec<&SubTrajectory>> =
                            micro.iter().map(|m| m.iter().collect()).collect();
                        sft_step(
                            &state.model,
                            &mut state.opt,
                            state.precision.as_ref(),
                            &rows,
                            lr,
                            max_grad_norm,
                        )
                    })
                });
                let _ = reply.send(out.map_err(|e| LearnerFailure::Step(e.to_string())));
            }
            LearnerMsg::RlStep {
                micro,
                hyper,
                lr,
                max_grad_norm,
                reply,
            } => {
                let out = tokio::task::block_in_place(|| {
                    on_compute_pool(|| {
                        let rows: Vec<Vec<&SubTrajectory>> =
                            micro.iter().map(|m| m.iter().collect()).collect();
                        rl_step(
                            &state.model,
                            state.reference.as_ref(),
                            &mut state.opt,
                            state.precision.as_ref(),
                            &rows,
                            &hyper,
                            lr,
                            max_grad_norm,
                        )
                    })
                });
                let _ = reply.send(out.map_err(|e| LearnerFailure::Step(e.to_string())));
            }
            LearnerMsg::ExportState(reply) => {
                let _ = reply.send(
                    state
                        .opt
                        .export()
                        .map_err(|e| LearnerFailure::Export(e.to_string())),
                );
            }
            LearnerMsg::Weights(reply) => {
                // Detached copies: the policy and the writer must not see later steps.
                let copied: Result<BTreeMap<String, Tensor>, candle_core::Error> =
                    Learner::weights(&state.opt)
                        .into_iter()
                        .map(|(n, t)| t.copy().map(|t| (n, t)))
                        .collect();
                let _ = reply.send(copied.map_err(|e| LearnerFailure::Export(e.to_string())));
            }
        }
        Ok(())
    }
}
