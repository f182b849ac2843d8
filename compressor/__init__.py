"""compressor"""
