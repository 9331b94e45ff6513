"""Training the project's own small model (`mini-sd`) and the classifier that judges its images.

Nothing here runs while serving: `stepfleet train` and `stepfleet bench quality` import it.
"""
