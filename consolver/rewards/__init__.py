"""Rewards: frozen similarity models between a preview and its target (see ``base``)."""

from consolver.rewards.base import CompositeReward, Reward, build_reward, build_rewards, register_reward, registered_rewards

__all__ = ["CompositeReward", "Reward", "build_reward", "build_rewards", "register_reward", "registered_rewards"]
