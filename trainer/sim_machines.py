"""Machine models for the factory simulator (see trainer/simulate.py for the public API).

A model turns operating drivers (ramped regime setpoints, short transients, ambient
temperature) and fault intensities into measured sensor signals. Everything is vectorised
numpy; time constants are in seconds so the physics does not depend on the sample period.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# kind -> sensor -> measurement resolution (transmitter/ADC step). Order = CSV column order.
RESOLUTION: dict[str, dict[str, float]] = {
    "pump": {"vibration_rms": 0.001, "bearing_temp": 0.01, "motor_current": 0.01, "discharge_pressure": 0.001,
             "flow": 0.01, "speed_rpm": 0.1, "suction_pressure": 0.001, "motor_temp": 0.01},
    "motor": {"vibration_x": 0.001, "vibration_y": 0.001, "winding_temp": 0.01, "current": 0.01,
              "speed_rpm": 0.1, "ambient_temp": 0.01, "bearing_temp": 0.01, "voltage": 0.1},
    "compressor": {"vibration": 0.001, "discharge_temp": 0.01, "discharge_pressure": 0.001, "current": 0.01,
                   "oil_temp": 0.01, "oil_pressure": 0.001, "suction_pressure": 0.0001, "speed_rpm": 0.1},
}
KINDS: dict[str, list[str]] = {kind: list(sensors) for kind, sensors in RESOLUTION.items()}

# Regime operating points (two normalised coordinates whose meaning is per kind, see models).
OPERATING_POINTS = {
    "pump": [(1.0, 1.0), (0.9, 0.85), (0.8, 0.95), (0.7, 0.7), (0.6, 0.8)],  # (speed, valve opening)
    "motor": [(1.0, 0.9), (0.9, 0.75), (0.75, 0.6), (0.6, 0.45), (1.0, 0.55)],  # (speed, load torque)
    "compressor": [(1.0, 1.0), (0.85, 1.0), (0.7, 0.97), (0.55, 0.97), (0.45, 1.03)],  # (air demand, pressure setpoint)
}


# ---------------------------------------------------------------- signal helpers
def lag(x: np.ndarray, tau_s: float, dt: float, y0: float | None = None) -> np.ndarray:
    """First-order lag y' = (x - y) / tau, exact for piecewise-constant input.

    Vectorised in blocks via the closed form y[n] = a^(n+1) y[-1] + (1-a) a^n sum_k a^-k x[k];
    the block length keeps a^-k below e^10 so the cumulative sum stays well conditioned.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    if x.size == 0:
        return out
    a = math.exp(-dt / tau_s)
    if a < 1e-12:
        return x.copy()
    block = int(max(1, min(4096, 10.0 / -math.log(a))))
    k = np.arange(block)
    a_k, a_inv = a ** k, a ** -k.astype(np.float64)
    prev = float(x[0] if y0 is None else y0)
    for s in range(0, x.size, block):
        xb = x[s:s + block]
        n = xb.size
        yb = a_k[:n] * a * prev + (1 - a) * a_k[:n] * np.cumsum(xb * a_inv[:n])
        out[s:s + n] = yb
        prev = yb[-1]
    return out


def ar_noise(rng: np.random.Generator, n: int, dt: float, tau_s: float) -> np.ndarray:
    """Unit-variance coloured (AR(1) / Ornstein-Uhlenbeck) noise with correlation time tau_s."""
    a = math.exp(-dt / tau_s)
    sd = math.sqrt((1 - a) / (1 + a))  # stationary sd of the lag filter driven by unit white noise
    w = rng.standard_normal(n)
    y0 = rng.standard_normal() * sd  # start in the stationary distribution, not at zero
    return lag(w, tau_s, dt, y0) / sd if sd > 0 else w


def bursts(rng: np.random.Generator, n: int, dt: float, rate_hz: float, tau_s: float) -> np.ndarray:
    """Random impulsive events (exponential amplitudes) decaying with tau_s; mean height ~1."""
    hits = (rng.random(n) < min(1.0, rate_hz * dt)) * rng.exponential(1.0, n)
    return lag(hits, tau_s, dt, 0.0) * (1 + tau_s / dt)  # undo the filter's attenuation roughly


@dataclass
class Drivers:
    t: np.ndarray  # seconds since the first sample
    dt: float
    op: np.ndarray  # (T, 2) operating point, piecewise constant with linear ramps between regimes
    bump: np.ndarray  # (T,) short normal transients in load units (valve kicks, load impacts, demand surges)
    ambient: np.ndarray  # hall temperature, degC


@dataclass
class Faults:
    """Fault intensities over time (severity x progression, 0 when absent) fed into a model."""
    wear: np.ndarray
    cav: np.ndarray
    heat: np.ndarray
    imb: np.ndarray
    rng: np.random.Generator  # fault-only randomness, so faults never perturb the normal noise draws


def machine_params(kind: str, rng: np.random.Generator) -> dict[str, float]:
    """Per-machine physical constants (nameplate, thermal time constants, site climate)."""
    u = rng.uniform
    p = {"amb_base": u(18, 26), "amb_amp": u(2, 5)}
    if kind == "pump":
        p |= dict(rpm=float(rng.choice([1480.0, 2960.0])), q_nom=u(80, 200), dp_nom=u(3, 6), ps0=u(1.2, 2.0),
                  i_nom=u(30, 80), vib0=u(1.0, 2.2), bearing_rise=u(15, 25), tau_bearing=u(500, 900),
                  motor_rise=u(35, 50), tau_motor=u(700, 1200))
    elif kind == "motor":
        p |= dict(rpm=float(rng.choice([985.0, 1475.0, 2955.0])), i_fl=u(20, 120), slip=u(0.015, 0.035),
                  vib0=u(0.8, 1.8), vy_ratio=u(0.6, 0.9), em_vib=u(0.2, 0.5), winding_rise=u(50, 70),
                  tau_winding=u(900, 1500), bearing_rise=u(15, 25), tau_bearing=u(600, 1000))
    else:  # compressor: oil-injected screw with variable-speed drive
        p |= dict(rpm=float(np.round(u(2900, 3600), -1)), p_nom=u(7, 8.5), i_nom=u(50, 150), vib0=u(1.5, 3.0),
                  filter_dp=u(0.02, 0.05), oil_rise=u(48, 58), tau_oil=u(600, 1000), dis_rise=u(15, 25),
                  tau_dis=u(60, 120))
    return p


def make_drivers(kind: str, rows: int, dt: float, epoch0: float, rng: np.random.Generator,
                 params: dict[str, float], regimes: bool) -> Drivers:
    t = np.arange(rows, dtype=np.float64) * dt
    pts = np.asarray(OPERATING_POINTS[kind], dtype=np.float64)
    jitter = lambda i: pts[i] * (1 + rng.uniform(-0.03, 0.03, 2))  # noqa: E731 - recipes are never set exactly
    bump = np.zeros(rows)
    if regimes:
        # Piecewise setpoints: dwell (exponential, >= 3 min) then a linear ramp to another regime.
        idx = int(rng.integers(len(pts)))
        kt, kv, now = [0.0], [jitter(idx)], 0.0
        while True:
            now += max(180.0, rng.exponential(900.0))
            if now >= rows * dt:
                break
            idx = int(rng.choice([j for j in range(len(pts)) if j != idx]))
            ramp = rng.uniform(20.0, 120.0)
            kt += [now, now + ramp]
            kv += [kv[-1], jitter(idx)]
            now += ramp
        kv = np.asarray(kv)
        op = np.column_stack([np.interp(t, kt, kv[:, 0]), np.interp(t, kt, kv[:, 1])])
        # Normal transients (~1 per 10 min): fast rise, exponential decay over seconds.
        n_events = int(rng.poisson(rows * dt / 600.0))
        times = rng.uniform(0, rows * dt, n_events)
        amps = rng.uniform(0.04, 0.12, n_events) * rng.choice([-1.0, 1.0], n_events)
        taus = rng.uniform(5.0, 30.0, n_events)
        for te, amp, tau in zip(times, amps, taus):
            i0 = int(te // dt)
            i1 = min(rows, i0 + int(math.ceil(6 * tau / dt)) + 1)
            seg = np.maximum(t[i0:i1] - te, 0.0)
            bump[i0:i1] += amp * (1 - np.exp(-seg / 1.5)) * np.exp(-seg / tau)
    else:
        op = np.tile(pts[0], (rows, 1))
    # Hall temperature: daily cycle on wall-clock time (peak 15:00 UTC) plus slow weather drift.
    hour = ((epoch0 + t) % 86400.0) / 3600.0
    ambient = (params["amb_base"] + params["amb_amp"] * np.sin(2 * np.pi * (hour - 9.0) / 24.0)
               + 0.4 * ar_noise(rng, rows, dt, 3600.0))
    return Drivers(t, dt, op, bump, ambient)


# ---------------------------------------------------------------- machine models
def _vib_noise(rng, n, dt, noise, sigma=0.06):
    """Multiplicative vibration noise: RMS sensors are noisy and positively skewed."""
    return np.exp(noise * (sigma * rng.standard_normal(n) + 0.04 * ar_noise(rng, n, dt, 5.0)))


def pump(d: Drivers, p: dict, fx: Faults, rng: np.random.Generator, noise: float) -> dict[str, np.ndarray]:
    """Centrifugal pump on a VFD; affinity laws couple speed, flow, head and power."""
    n, dt, amb = d.t.size, d.dt, d.ambient
    s = d.op[:, 0]
    valve = np.clip(d.op[:, 1] + d.bump, 0.3, 1.15)
    churn1, churn2 = ar_noise(fx.rng, n, dt, 1.5), ar_noise(fx.rng, n, dt, 1.5)
    # Cavitation: vapour bubbles choke the impeller -> flow and head drop and fluctuate.
    q = s * valve * (1 - 0.10 * fx.cav + 0.05 * fx.cav * churn1)
    head = (1.2 * s**2 - 0.2 * q**2) * (1 - 0.15 * fx.cav + 0.06 * fx.cav * churn2)
    level = 0.08 * ar_noise(rng, n, dt, 1800.0)  # supply-tank level wander
    suction = p["ps0"] + level - 0.25 * q**2 - 0.7 * p["ps0"] * fx.cav  # NPSH available collapses
    discharge = suction + p["dp_nom"] * head
    eff = 0.78 - 0.3 * (valve - 1) ** 2  # best efficiency at the design point
    power = q * head * 0.78 / eff  # 1.0 at the nominal point
    current = p["i_nom"] * (0.3 + 0.7 * power) * (1 + 0.05 * fx.wear)  # worn bearings add friction
    # Temperatures: first-order thermal lag on the heat input; self-cooled motor cools worse at low speed.
    motor_temp = amb + lag(p["motor_rise"] * (current / p["i_nom"]) ** 2 / (0.4 + 0.6 * s), p["tau_motor"], dt)
    overheat = 25.0 * fx.heat * (0.5 + 0.5 * power)  # failed motor fan: drift beyond the load coupling
    motor_temp += overheat
    bearing_temp = amb + lag(p["bearing_rise"] * (0.3 + 0.7 * s**2), p["tau_bearing"], dt) + 15.0 * fx.wear + 0.2 * overheat
    # Vibration: residual unbalance ~ speed^2, recirculation off the design point, faults in quadrature.
    v0 = p["vib0"]
    base = v0 * (0.3 + 0.7 * s**2) * (1 + 0.8 * (valve - 1) ** 2)
    vib = np.sqrt(base**2 + (3.0 * v0 * fx.imb * s**2) ** 2 + (3.0 * v0 * fx.wear) ** 2)
    vib += v0 * (1.0 * fx.wear * bursts(fx.rng, n, dt, 0.05, 1.0) + 1.5 * fx.cav * bursts(fx.rng, n, dt, 0.08, 2.0))
    g = rng.standard_normal
    return {
        "vibration_rms": vib * _vib_noise(rng, n, dt, noise),
        "bearing_temp": bearing_temp + 0.05 * noise * g(n),
        "motor_current": current * (1 + noise * (0.005 * g(n) + 0.02 * fx.cav * churn1)),
        "discharge_pressure": discharge + noise * (0.01 * g(n) + 0.06 * fx.cav * churn2),
        # Flow meters see turbulence: the noisiest channel, partly coloured.
        "flow": p["q_nom"] * q * (1 + noise * (0.015 * g(n) + 0.01 * ar_noise(rng, n, dt, 3.0))),
        "speed_rpm": p["rpm"] * s * (1 - 0.01 * power) + noise * 1.0 * g(n),
        "suction_pressure": suction + noise * (0.008 * g(n) + 0.04 * fx.cav * churn1),
        "motor_temp": motor_temp + 0.08 * noise * g(n),
    }


def motor(d: Drivers, p: dict, fx: Faults, rng: np.random.Generator, noise: float) -> dict[str, np.ndarray]:
    """Induction motor on a V/f drive turning a process load (for cavitation: the driven pump cavitates)."""
    n, dt, amb = d.t.size, d.dt, d.ambient
    s = d.op[:, 0]
    churn = ar_noise(fx.rng, n, dt, 1.0)
    torque = np.clip(d.op[:, 1] + d.bump, 0.1, 1.3)
    torque = torque * (1 - 0.15 * fx.cav + 0.10 * fx.cav * churn) + 0.04 * fx.wear  # unloading pump / friction
    speed = p["rpm"] * s * (1 - p["slip"] * torque)  # slip grows with torque
    voltage = 400.0 * np.clip(0.05 + 0.95 * s, 0.0, 1.0)  # V/f law: redundant with speed
    current = p["i_fl"] * np.sqrt(0.35**2 + (0.94 * torque) ** 2)  # magnetising + torque components
    i2 = (current / p["i_fl"]) ** 2  # copper losses
    overheat = 30.0 * fx.heat * (0.5 + 0.5 * torque)  # blocked cooling fan
    winding = amb + lag(p["winding_rise"] * i2 / (0.35 + 0.65 * s), p["tau_winding"], dt) + overheat
    bearing = (amb + lag(p["bearing_rise"] * (0.4 + 0.6 * s**2) + 8.0 * i2, p["tau_bearing"], dt)
               + 15.0 * fx.wear + 0.2 * overheat)
    v0, ry = p["vib0"], p["vy_ratio"]
    em = p["em_vib"] * torque  # electromagnetic (2x line) vibration follows torque
    base = v0 * (0.3 + 0.7 * s**2)
    imb = v0 * fx.imb * s**2  # unbalance force ~ m r omega^2; stiffer vertically -> less in y
    impacts = v0 * (1.0 * fx.wear * bursts(fx.rng, n, dt, 0.05, 1.0) + 1.5 * fx.cav * bursts(fx.rng, n, dt, 0.08, 2.0))
    vx = np.sqrt(base**2 + em**2 + (3.0 * imb) ** 2 + (3.0 * v0 * fx.wear) ** 2) + impacts
    vy = np.sqrt((ry * base) ** 2 + em**2 + (2.0 * imb) ** 2 + (3.0 * ry * v0 * fx.wear) ** 2) + 0.8 * impacts
    structure = np.exp(0.04 * noise * ar_noise(rng, n, dt, 10.0))  # shared frame resonance -> x/y correlated
    g = rng.standard_normal
    return {
        "vibration_x": vx * structure * _vib_noise(rng, n, dt, noise, 0.05),
        "vibration_y": vy * structure * _vib_noise(rng, n, dt, noise, 0.05),
        "winding_temp": winding + 0.08 * noise * g(n),
        "current": current * (1 + 0.004 * noise * g(n)),
        "speed_rpm": speed + 0.5 * noise * g(n),
        "ambient_temp": amb + 0.1 * noise * g(n),
        "bearing_temp": bearing + 0.05 * noise * g(n),
        "voltage": voltage + 0.8 * noise * g(n),
    }


def compressor(d: Drivers, p: dict, fx: Faults, rng: np.random.Generator, noise: float) -> dict[str, np.ndarray]:
    """Oil-injected screw compressor; the VSD follows air demand to hold the pressure setpoint."""
    n, dt, amb = d.t.size, d.dt, d.ambient
    demand = np.clip(d.op[:, 0] + d.bump, 0.35, 1.1)
    p_set = p["p_nom"] * d.op[:, 1]
    s = np.clip(lag(demand, 8.0, dt), 0.35, 1.05)  # drive ramp limit
    churn = ar_noise(fx.rng, n, dt, 1.0)
    # Inlet starvation (clogged intake filter / throttled inlet), the compressor's cavitation analogue.
    suction = 1.0 - p["filter_dp"] * s**2 - 0.3 * fx.cav
    # Pressure sags while demand outruns the drive, and when the starved inlet cannot deliver.
    discharge = (p_set - 2.5 * (demand - s) + 0.03 * ar_noise(rng, n, dt, 20.0)
                 - 0.4 * fx.cav - 0.15 * fx.cav * churn)
    ratio = (discharge + 1.013) / suction
    ratio_nom = (p["p_nom"] + 1.013) / (1 - p["filter_dp"])
    work = np.log(ratio) / math.log(ratio_nom)  # specific compression work
    power = s * work * suction / (1 - p["filter_dp"])  # mass flow ~ speed x inlet density
    current = p["i_nom"] * (0.25 + 0.75 * power) * (1 + 0.04 * fx.wear)
    overheat = 18.0 * fx.heat * (0.5 + 0.5 * power)  # fouled oil cooler
    oil_base = amb + lag(p["oil_rise"] * (0.3 + 0.7 * power), p["tau_oil"], dt)
    oil = oil_base + overheat + 10.0 * fx.wear  # bearing friction heats the oil
    discharge_temp = lag(oil_base + p["dis_rise"] * work, p["tau_dis"], dt) + 1.1 * overheat + 10.0 * fx.wear
    oil_pressure = 0.85 * discharge - 0.4 - 0.4 * fx.wear  # worn bearings leak oil pressure
    v0 = p["vib0"]
    base = v0 * (0.3 + 0.7 * s**2) * (0.8 + 0.2 * work)  # rotor lobes pulse harder at higher pressure ratio
    vib = np.sqrt(base**2 + (3.0 * v0 * fx.imb * s**2) ** 2 + (3.0 * v0 * fx.wear) ** 2)
    vib += v0 * (1.0 * fx.wear * bursts(fx.rng, n, dt, 0.05, 1.0) + 1.5 * fx.cav * bursts(fx.rng, n, dt, 0.08, 2.0))
    g = rng.standard_normal
    return {
        "vibration": vib * _vib_noise(rng, n, dt, noise),
        "discharge_temp": discharge_temp + 0.1 * noise * g(n),
        "discharge_pressure": discharge + 0.01 * noise * g(n),
        "current": current * (1 + 0.005 * noise * g(n) + 0.03 * fx.cav * churn),  # surging intake
        "oil_temp": oil + 0.05 * noise * g(n),
        "oil_pressure": oil_pressure + 0.015 * noise * g(n),
        "suction_pressure": suction + 0.002 * noise * g(n),
        "speed_rpm": p["rpm"] * s + 1.0 * noise * g(n),
    }


MODELS = {"pump": pump, "motor": motor, "compressor": compressor}
