"""The identifying attributes of DICOM PS3.15 Annex E (Basic Application Level Confidentiality
Profile, table E.1-1), as pydicom keywords.

One table, used three ways: a protocol schema may not read these attributes (`check_schema`),
the scan checks every allow-listed value against the values these attributes hold in the same
header (`pgjax/data/redaction.py`), and `pgjax audit` searches a store for them. Elements of
the identifying value representations (IDENTIFYING_VRS) count as identifying wherever they
are, listed here or not.
"""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword

# Value representations that hold identifiers by definition: names, dates, times, UIDs.
IDENTIFYING_VRS = frozenset({"PN", "DA", "DT", "TM", "UI"})

BASIC_PROFILE_KEYWORDS: frozenset[str] = frozenset(
    """
    AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate
    AcquisitionDateTime AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription
    AcquisitionTime ActualHumanPerformersSequence AdditionalPatientHistory AdmissionID
    AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime
    AffectedSOPInstanceUID Allergies Arbitrary AuthorObserverSequence BranchOfService
    CassetteID ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSubjectID
    ClinicalTrialSubjectReadingID ClinicalTrialTimePointDescription ClinicalTrialTimePointID
    CommentsOnThePerformedProcedureStep ConcatenationUID
    ConfidentialityConstraintOnPatientDataDescription
    ContentCreatorName ContentCreatorIdentificationCodeSequence ContentDate ContentSequence
    ContentTime ContrastBolusAgent ContributionDescription CountryOfResidence
    CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding
    DerivationDescription DetectorID DeviceSerialNumber DeviceUID DigitalSignatureUID
    DigitalSignaturesSequence DimensionOrganizationUID DischargeDiagnosisDescription
    DistributionAddress DistributionName DoseReferenceUID EthnicGroup FailedSOPInstanceUIDList
    FiducialUID FillerOrderNumberImagingServiceRequest FrameComments FrameOfReferenceUID
    GantryID GeneratorID GraphicAnnotationSequence HumanPerformerName
    HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
    ImagePresentationComments ImagingServiceRequestComments Impressions InstanceCreationDate
    InstanceCreationTime InstanceCreatorUID InstitutionAddress InstitutionCodeSequence
    InstitutionName InstitutionalDepartmentName InsurancePlanIdentification
    IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
    InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer
    InterpretationRecorder InterpretationText InterpretationTranscriber IrradiationEventUID
    IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID LargePaletteColorLookupTableUID
    LastMenstrualDate MAC MediaStorageSOPInstanceUID MedicalAlerts MedicalRecordLocator
    MilitaryRank ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID
    NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation
    OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber OrderEnteredBy
    OrderEntererLocation OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence
    OtherPatientNames OverlayDate OverlayTime ParticipantSequence
    PatientAddress PatientAge PatientBirthDate PatientBirthName PatientBirthTime
    PatientComments PatientID PatientInstitutionResidence PatientInsurancePlanCodeSequence
    PatientMotherBirthName PatientName PatientPrimaryLanguageCodeSequence
    PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSex
    PatientSexNeutered PatientSize PatientState PatientTelephoneNumbers PatientTransportArrangements
    PatientWeight PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepEndDate
    PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate
    PerformedProcedureStepStartTime PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName
    PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
    PerformingPhysicianName PersonAddress PersonIdentificationCodeSequence PersonName
    PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
    PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence
    PlacerOrderNumberImagingServiceRequest PlateID PreMedication PregnancyStatus
    ProtocolName ReasonForTheImagingServiceRequest ReasonForStudy ReferencedDigitalSignatureSequence
    ReferencedFrameOfReferenceUID ReferencedGeneralPurposeScheduledProcedureStepTransactionUID
    ReferencedImageSequence ReferencedPatientAliasSequence ReferencedPatientSequence
    ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence
    ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedStudySequence
    ReferringPhysicianAddress ReferringPhysicianIdentificationSequence ReferringPhysicianName
    ReferringPhysicianTelephoneNumbers RegionOfResidence RelatedFrameOfReferenceUID
    RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments
    RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
    RequestedSOPInstanceUID RequestingPhysician RequestingService
    RequestingServiceCodeSequence ResponsibleOrganization ResponsiblePerson ResultsComments
    ResultsDistributionListSequence ResultsIDIssuer ReviewerName ScheduledHumanPerformersSequence
    ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
    ScheduledPerformingPhysicianName ScheduledProcedureStepDescription
    ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime ScheduledProcedureStepID
    ScheduledProcedureStepLocation ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime
    ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence ScheduledStationName
    ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
    SeriesDate SeriesDescription SeriesInstanceUID SeriesTime ServiceEpisodeDescription
    ServiceEpisodeID SmokingStatus SOPInstanceUID SourceImageSequence SpecialNeeds StationName
    StorageMediaFileSetUID StudyComments StudyDate StudyDescription StudyID
    StudyIDIssuer StudyInstanceUID StudyTime SynchronizationFrameOfReferenceUID
    TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TextComments TextString
    TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
    TransactionUID UID VerifyingObserverIdentificationCodeSequence VerifyingObserverName
    VerifyingObserverSequence VerifyingOrganization VisitComments
    """.split()
)

# Descriptions the Basic Profile lets through with its Clean Descriptors Option. The protocol
# schema may read them as free text only: normalised hard, checked against the header's own
# identifiers, and kept as a token only when enough patients share the value.
DESCRIPTOR_KEYWORDS = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "PerformedProcedureStepDescription",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "AcquisitionProtocolDescription",
        "DerivationDescription",
        "ContrastBolusAgent",
    }
)

# tag -> keyword, for the lookups of the scan and the audit (every keyword is pydicom's: a
# test checks none is unknown).
BASIC_PROFILE_TAGS: dict[int, str] = {
    int(tag_for_keyword(k)): k for k in BASIC_PROFILE_KEYWORDS if tag_for_keyword(k) is not None
}
