"""Robot modality: environments, policies with Gaussian / categorical step distributions, and the
`robot_policy` adapter (students act in the environment, teachers score the visited states).

- `envs`:     the environment protocol, fixed initial states split train / eval, the built-in
              point-mass reaching environment (fast tests, CPU demos).
- `policies`: a Gaussian MLP student and a privileged scripted expert for the point mass.
- `adapter`:  rollouts in the environment, re-scoring, evaluation (success rate, entropy).
"""
