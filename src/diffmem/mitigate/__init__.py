"""mitigate"""
