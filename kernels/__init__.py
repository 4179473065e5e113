"""lowbit.kernels"""
