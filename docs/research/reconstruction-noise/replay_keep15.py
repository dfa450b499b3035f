"""Same as replay.py, but the attacker's view keeps all 15 rounds of noisy messages (KEEP_ROUNDS=15)."""
import sys
import replay
replay.KEEP_ROUNDS = 15
sigma = float(sys.argv[1])
replay.run("noisy", 129, sigma, "correct", 15, out=f"runs/r1_m129_s{sigma}_correct_keep15", evaluate=False, amode="rank1")
