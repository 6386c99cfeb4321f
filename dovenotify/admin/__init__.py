"""dovenotify.admin"""
