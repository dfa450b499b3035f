"""replay with all 15 rounds kept for the attacker AND evaluation on."""
import sys
import replay
replay.KEEP_ROUNDS = 15
sigma = float(sys.argv[1])
replay.run("noisy", 129, sigma, "correct", 15, out=f"runs/r1_m129_s{sigma}_correct_keep15e", evaluate=True, amode="rank1")
