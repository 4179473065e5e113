"""lowbit.fast"""
