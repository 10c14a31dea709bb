//! AdamW (Loshchilov & Hutter 2019, as `torch.optim.AdamW`), global-norm gradient clipping and
//! the learning-rate schedules of transformers (`get_cosine_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup`, constant with warmup).
//!
//! Unlike `candle_nn::AdamW`, a variable without a gradient is an error, not silently skipped:
//! it means the graph was cut somewhere.

use candle_core::{Tensor, Var};
use forge_manifest::Schedule;

use crate::{Result, TrainError};

/// Optimizer state of one variable.
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (bias correction uses it).
    pub step: usize,
    pub moments: Vec<Moments>,
    /// Per variable: whether weight decay applies (not to biases and norm weights, as in
    /// transformers' Trainer).
    pub decay: Vec<bool>,
}

impl AdamW {
    pub fn new(vars: &[(String, Var)], weight_decay: f64) -> Result<AdamW> {
        let moments = vars
            .iter()
            .map(|(_, v)| Ok(Moments { m: v.zeros_like()?, v: v.zeros_like()? }))
            .collect::<Result<Vec<_>>>()?;
        let decay = vars.iter().map(|(n, _)| !(n.ends_with(".bias") || n.ends_with("norm.weight"))).collect();
        Ok(AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0, moments, decay })
    }

    /// One update with learning rate `lr`.
    pub fn update(&mut self, vars: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            let st = &mut self.moments[i];
            st.m = ((&st.m * b1)? + (g * (1.0 - b1))?)?;
            st.v = ((&st.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&st.m / c1)?;
            let v_hat = (&st.v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let mut p = var.as_tensor().detach();
            if self.decay[i] && self.weight_decay > 0.0 {
                p = (&p * (1.0 - lr * self.weight_decay))?;
            }
            var.set(&(p - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (0: no clipping); returns
/// the norm before clipping. A non-finite norm is an error: the step would poison the weights.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Err(TrainError::Diverged(format!("the gradient norm is {norm}")));
    }
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// The learning rate at optimizer step `step` (0-based) of `total`, after `warmup` linear
/// warmup steps.
pub fn lr_at(schedule: Schedule, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress).max(0.0),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_torch_adamw_on_a_quadratic() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01), three steps of loss = sum(p**2) from
        // p = [1, -2] in float64 gives [0.6989111831582322, -1.6949445143849768].
        let v = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), v.clone())];
        let mut opt = AdamW::new(&vars, 0.01).unwrap();
        for _ in 0..3 {
            let g = (v.as_tensor() * 2.0).unwrap();
            opt.update(&vars, &[g], 0.1).unwrap();
        }
        let p: Vec<f64> = v.as_tensor().to_vec1().unwrap();
        assert!((p[0] - 0.6989111831582322).abs() < 1e-12, "{p:?}");
        assert!((p[1] + 1.6949445143849768).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn clipping_and_schedules() {
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        assert!((clip(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        let after: Vec<f32> = g[0].to_vec1().unwrap();
        assert!((after[0] - 0.6).abs() < 1e-5 && (after[1] - 0.8).abs() < 1e-5);
        let mut nan = vec![Tensor::new(&[f32::NAN], &Device::Cpu).unwrap()];
        assert!(clip(&mut nan, 1.0).is_err());

        assert_eq!(lr_at(Schedule::Cosine, 1.0, 0, 10, 110), 0.0);
        assert_eq!(lr_at(Schedule::Cosine, 1.0, 5, 10, 110), 0.5);
        assert_eq!(lr_at(Schedule::Cosine, 1.0, 10, 10, 110), 1.0);
        assert!((lr_at(Schedule::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(lr_at(Schedule::Cosine, 1.0, 110, 10, 110).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 2.0, 60, 10, 110), 2.0);
    }
}
