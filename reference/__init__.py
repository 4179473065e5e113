"""lowbit.reference"""
