"""Ray plumbing shared by every job: joining or starting Ray (ray_session) and building Ray Train trainers."""
