"""A float64 transcription of the samplers in ComfyUI's ``comfy/k_diffusion/sampling.py`` that k-diffusion lacks
(``sample_ipndm``, ``sample_ipndm_v``, ``sample_gradient_estimation``, ``res_multistep``, ``sample_er_sde``), for
models whose half log-SNR is -log(sigma) (ComfyUI's EPS / V / EDM model samplings: no flow offset), the test's
reference: ComfyUI is no pip package. Written step by step as ComfyUI's code reads, tensors and all, ``model(x,
sigma * s_in)`` the denoiser, ``noise_sampler(sigma, sigma_next)`` the draws."""

from __future__ import annotations

import torch


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _ipndm_loop(model, x, sigmas, max_order, update):
    """The two iPNDM samplers' shared loop: ``update(i, order, x_cur, t_cur, t_next, d_cur, buffer)`` takes a step of
    order 2-4 (the Euler and denoising steps, and the slope buffer, as both ComfyUI functions keep them)."""
    s_in = x.new_ones([x.shape[0]])
    x_next, buffer = x, []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        else:
            x_next = update(i, order, x_cur, t_cur, t_next, d_cur, buffer)
        if len(buffer) == max_order - 1:
            for k in range(max_order - 2):
                buffer[k] = buffer[k + 1]
            buffer[-1] = d_cur
        else:
            buffer.append(d_cur)
    return x_next


def ipndm(model, x, sigmas, max_order=4):
    def update(i, order, x_cur, t_cur, t_next, d_cur, buffer):
        if order == 2:
            return x_cur + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
        if order == 3:
            return x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        return x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24

    return _ipndm_loop(model, x, sigmas, max_order, update)


def ipndm_v(model, x, sigmas, max_order=4):
    t_steps = sigmas

    def update(i, order, x_cur, t_cur, t_next, d_cur, buffer):
        if order == 2:
            h_n, h_n_1 = t_next - t_cur, t_cur - t_steps[i - 1]
            coeff1 = (2 + (h_n / h_n_1)) / 2
            coeff2 = -(h_n / h_n_1) / 2
            return x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1])
        elif order == 3:
            h_n, h_n_1, h_n_2 = t_next - t_cur, t_cur - t_steps[i - 1], t_steps[i - 1] - t_steps[i - 2]
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            return x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2])
        else:
            h_n, h_n_1 = t_next - t_cur, t_cur - t_steps[i - 1]
            h_n_2, h_n_3 = t_steps[i - 1] - t_steps[i - 2], t_steps[i - 2] - t_steps[i - 3]
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n
                     / (6 * (h_n + h_n_1 + h_n_2))) * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) \
                / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 \
                - (1 + (h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))) * temp2
            ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
            coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * h_n_1 / h_n_2
            return x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2]
                                               + coeff4 * buffer[-3])

    return _ipndm_loop(model, x, sigmas, max_order, update)


def gradient_estimation(model, x, sigmas, ge_gamma=2.0, cfg_pp=False):
    """ComfyUI's ``sample_gradient_estimation``; with ``cfg_pp`` ``model`` returns (denoised, uncond_denoised)."""
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised, uncond_denoised = denoised if cfg_pp else (denoised, None)
        d = to_d(x, sigmas[i], uncond_denoised if cfg_pp else denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def gradient_estimation_cfg_pp(model, x, sigmas, ge_gamma=2.0):
    return gradient_estimation(model, x, sigmas, ge_gamma=ge_gamma, cfg_pp=True)


def res_multistep(model, x, sigmas, noise_sampler, eta=0.0, s_noise=1.0, cfg_pp=False):
    """ComfyUI's ``res_multistep``; with ``cfg_pp`` ``model`` returns (denoised, uncond_denoised)."""
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    def phi1_fn(t):
        return torch.expm1(t) / t

    def phi2_fn(t):
        return (phi1_fn(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        denoised, uncond_denoised = denoised if cfg_pp else (denoised, None)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                d = to_d(x, sigmas[i], uncond_denoised)
                x = denoised + d * sigma_down
            else:
                d = to_d(x, sigmas[i], denoised)
                x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond_denoised)
                x = sigma_fn(h) * x + h * (b1 * uncond_denoised + b2 * old_denoised)
            else:
                x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = (uncond_denoised if cfg_pp else denoised), sigma_down
    return x


def res_multistep_cfg_pp(model, x, sigmas, noise_sampler, eta=0.0, s_noise=1.0):
    return res_multistep(model, x, sigmas, noise_sampler, eta=eta, s_noise=s_noise, cfg_pp=True)


def er_sde(model, x, sigmas, noise_sampler, s_noise=1.0, max_stage=3):
    s_in = x.new_ones([x.shape[0]])

    def noise_scaler(v):
        return v * ((v ** 0.3).exp() + 10.0)

    num_integration_points = 200.0
    point_indice = torch.arange(0, num_integration_points, dtype=torch.float64)
    er_lambdas = sigmas.log().neg().neg().exp()  # exp(-half_log_snr), half_log_snr = -log(sigma)
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / er_lambda_s, sigmas[i + 1] / er_lambda_t
            r_alpha = alpha_t / alpha_s
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised
            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / num_integration_points
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = noise_scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3:
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * (
                    er_lambda_t ** 2 - er_lambda_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return x


# CFG++ (ComfyUI's *_cfg_pp, for models whose alpha is 1: EPS / V / EDM): ``model(x, sigma)`` returns the guided x0
# and the unconditional one, as ComfyUI's post-CFG hook hands ``uncond_denoised`` to the sampler

def euler_ancestral_cfg_pp(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], uncond_denoised)
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            x = denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_2m_cfg_pp(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])

    def t_fn(sigma):
        return sigma.log().neg()

    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


def dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i] * s_in)
        guidance_vector = denoised - uncond_denoised
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], uncond_denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h / 2).expm1() * uncond_denoised
            _, uncond_denoised_2 = model(x_2, sigma_fn(s) * s_in)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * uncond_denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance_vector
    return x


def heunpp2(model, x, sigmas, draws=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """ComfyUI's ``sample_heunpp2`` (its churn's draw from ``draws(i)`` in place of torch.randn_like)."""
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + draws(i) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            w = 2 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w1 = 1 - w2
            x = x + (d * w1 + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            dt_2 = sigmas[i + 2] - sigmas[i + 1]
            x_3 = x_2 + d_2 * dt_2
            denoised_3 = model(x_3, sigmas[i + 2] * s_in)
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w3 = sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            x = x + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _ei_h_phi_1(h):
    return torch.expm1(h)


def _ei_h_phi_2(h):
    return (torch.expm1(h) - h) / h


def _seeds_first_stage(x, sigmas, i, r, eta, s_noise, noise_sampler, denoised, inject_noise):
    """Both ComfyUI SEEDS functions' step prelude and first stage (their lines, shared here): (h, h_eta, alpha_t, the
    first stage's state and sigma, its noise)."""
    lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
    sigma_s_1 = lambda_s_1.neg().exp()
    alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
    alpha_t = sigmas[i + 1] * lambda_t.exp()
    x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * _ei_h_phi_1(-r * h_eta) * denoised
    sde_noise = None
    if inject_noise:
        sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
        x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
    return h, h_eta, alpha_t, x_2, sigma_s_1, sde_noise


def _carry_noise(sde_noise, segment_factor, noise_sampler, sigma_from, sigma_to):
    sde_noise = sde_noise * segment_factor.exp()
    return sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_from, sigma_to)


def seeds_2(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """ComfyUI's ``sample_seeds_2`` for alpha = 1 models (half log-SNR -log sigma, no flow offset)."""
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h, h_eta, alpha_t, x_2, sigma_s_1, sde_noise = _seeds_first_stage(x, sigmas, i, r, eta, s_noise,
                                                                           noise_sampler, denoised, inject_noise)
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = _ei_h_phi_2(-h_eta) / r
            b1 = _ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            sde_noise = _carry_noise(sde_noise, (r - 1) * h * eta, noise_sampler, sigma_s_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def seeds_3(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r_1=1. / 3, r_2=2. / 3):
    """ComfyUI's ``sample_seeds_3`` for alpha = 1 models."""
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h, h_eta, alpha_t, x_2, sigma_s_1, sde_noise = _seeds_first_stage(x, sigmas, i, r_1, eta, s_noise,
                                                                           noise_sampler, denoised, inject_noise)
        lambda_s_2 = torch.lerp(sigmas[i].log().neg(), sigmas[i + 1].log().neg(), r_2)
        sigma_s_2 = lambda_s_2.neg().exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        a3_2 = r_2 / r_1 * _ei_h_phi_2(-r_2 * h_eta)
        a3_1 = _ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            sde_noise = _carry_noise(sde_noise, (r_1 - r_2) * h * eta, noise_sampler, sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in)
        b3 = _ei_h_phi_2(-h_eta) / r_2
        b1 = _ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            sde_noise = _carry_noise(sde_noise, (r_2 - 1) * h * eta, noise_sampler, sigma_s_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x
